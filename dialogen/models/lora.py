"""LoRA adapters on a transformer, in PEFT's names and files.

An `Adapter` holds, for each adapted projection, two matrices A (r, in) and B (out, r); the
projection's output gains `dropout(a) @ A^T @ B^T * alpha / r`, where `a` is the projection's
input (after its norm or activation). The adapter sits beside the model: `attach(model)` adds
forward hooks to the model's Linears, whichever module the native swap put there (a reference
Linear, a BlockLinear, a HalfLinear), so the base keeps its weights as loaded and its state dict
and checkpoints stay those of the base.

Module names are Hugging Face's (`model.layers.0.self_attn.q_proj`, `transformer.h.0.attn.c_attn`),
as PEFT names them; a fused Linear of ours (qkv, gate_up) carries one adapter per part it joins,
each on its own rows. Files: `adapter_config.json` and `adapter_model.safetensors` with PEFT's
tensor names (`base_model.model.<module>.lora_A.weight`), so `peft.PeftModel.from_pretrained`
loads them on the Hugging Face base.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .layers import activate
from .transformer import Block, Config, Transformer

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def peft_modules(cfg: Config) -> dict[str, tuple[str, int, int]]:
    """Hugging Face module name -> (our Linear's name, first row, end row) of the weight it is."""
    hd, nh, nkv, f = cfg.head_dim, cfg.n_head, cfg.n_kv_head, cfg.d_ff
    out = {}
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        if cfg.arch == "gpt2":
            p = f"transformer.h.{i}."
            out[p + "attn.c_attn"] = (b + "attn.qkv", 0, (nh + 2 * nkv) * hd)
            out[p + "attn.c_proj"] = (b + "attn.o_proj", 0, cfg.d_model)
            out[p + "mlp.c_fc"] = (b + "mlp.up", 0, f)
            out[p + "mlp.c_proj"] = (b + "mlp.down", 0, cfg.d_model)
            continue
        p = f"model.layers.{i}."
        q, kv = nh * hd, nkv * hd
        out[p + "self_attn.q_proj"] = (b + "attn.qkv", 0, q)
        out[p + "self_attn.k_proj"] = (b + "attn.qkv", q, q + kv)
        out[p + "self_attn.v_proj"] = (b + "attn.qkv", q + kv, q + 2 * kv)
        out[p + "self_attn.o_proj"] = (b + "attn.o_proj", 0, cfg.d_model)
        out[p + "mlp.gate_proj"] = (b + "mlp.gate_up", 0, f)
        out[p + "mlp.up_proj"] = (b + "mlp.gate_up", f, 2 * f)
        out[p + "mlp.down_proj"] = (b + "mlp.down", 0, cfg.d_model)
    return out


def default_targets(cfg: Config) -> tuple[str, ...]:
    """Every projection of the blocks."""
    if cfg.arch == "gpt2":
        return ("c_attn", "c_proj", "c_fc")
    return ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def matching(cfg: Config, targets, flag: str = "--lora-targets") -> list[str]:
    """The module names that `targets` name, as PEFT matches them (the whole name or its last
    parts); a target that names no module is refused."""
    names = list(peft_modules(cfg))
    chosen = []
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            known = ", ".join(dict.fromkeys(n.rsplit(".", 1)[1] for n in names))
            raise UserError(f"{flag}: {t!r} names no module of this {cfg.arch} model (its modules: {known})")
        chosen += [n for n in hits if n not in chosen]
    return sorted(chosen, key=names.index)


@dataclass
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # as given (short names or whole module names)

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class Part(nn.Module):
    """One adapted module: A (r, in) and B (rows, r)."""

    def __init__(self, r: int, d_in: int, rows: int):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(r, d_in))
        self.B = nn.Parameter(torch.zeros(rows, r))


class Adapter(nn.Module):
    def __init__(self, cfg: Config, settings: LoraSettings, base: str | None = None):
        super().__init__()
        self.cfg, self.settings, self.base = cfg, settings, base
        self.names = matching(cfg, settings.targets)
        table = peft_modules(cfg)
        widths = _input_widths(cfg)
        self.parts = nn.ModuleDict()
        self.where: dict[str, list[tuple[int, int, str]]] = {}  # our Linear -> [(first row, end row, part key)]
        for name in self.names:
            ours, lo, hi = table[name]
            key = name.replace(".", "-")
            self.parts[key] = Part(settings.r, widths[ours], hi - lo)
            self.where.setdefault(ours, []).append((lo, hi, key))
        for spans in self.where.values():
            spans.sort()
        self.handles = []
        self.enabled = True  # off: the hooks add nothing (the base alone, e.g. DPO's reference model)
        self.hooked = []  # the model hooked (in a list: not a child module)

    def trains(self, prefix: str) -> bool:
        """Whether a part on a Linear whose name starts with `prefix` (a block's: "blocks.3.") takes a gradient."""
        return any(p.requires_grad for ours, spans in self.where.items() if ours.startswith(prefix)
                   for _, _, key in spans for p in self.parts[key].parameters())

    def init(self, seed: int):
        """PEFT's initialisation: A as nn.Linear's default (Kaiming uniform), B zero, so the adapted
        model starts as the base."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for part in self.parts.values():
                bound = 1 / math.sqrt(part.A.shape[1])
                part.A.copy_(torch.rand(part.A.shape, generator=g) * 2 * bound - bound)
                part.B.zero_()
        return self

    # --- the forward -----------------------------------------------------------------------
    def low(self, ours: str, a: torch.Tensor, training: bool) -> torch.Tensor:
        """scale * A a for every part of our Linear `ours`, their A stacked: (..., parts * r). One
        product serves the parts of a fused Linear (q, k and v), which share their input."""
        s, parts = self.settings, [self.parts[key] for _, _, key in self.where[ours]]
        if s.dropout and training:  # each part draws its own dropout mask, as peft's modules do
            h = torch.cat([F.linear(F.dropout(a, s.dropout, True), p.A.to(a.dtype)) for p in parts], dim=-1)
        else:
            A = parts[0].A if len(parts) == 1 else torch.cat([p.A for p in parts])
            h = F.linear(a, A.to(a.dtype))
        return h * s.scale

    def up(self, ours: str, out_features: int) -> torch.Tensor:
        """The parts' B as one (out, parts * r) matrix, block-diagonal, with zero rows where no part
        adapts our Linear `ours`: one product (and no concatenation) maps `low` to the output."""
        blocks, row = [], 0
        for lo, hi, key in self.where[ours]:
            B = self.parts[key].B
            if lo > row:
                blocks.append(B.new_zeros(lo - row, 0))
            blocks.append(B)
            row = hi
        if row < out_features:
            blocks.append(B.new_zeros(out_features - row, 0))
        return blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)

    def delta(self, ours: str, a: torch.Tensor, out_features: int, training: bool) -> torch.Tensor:
        """What the adapter adds to our Linear `ours` for its input `a` (..., in): (..., out)."""
        return F.linear(self.low(ours, a, training), self.up(ours, out_features).to(a.dtype))

    def attach(self, model: Transformer) -> "Adapter":
        """Hook the adapter into `model`'s Linears; a fused native block, which bypasses them, is
        put back as the reference block (its Linears keep their swapped-in weights)."""
        self.detach()
        for i, block in enumerate(model.blocks):
            if type(block) is not Block and hasattr(block, "reference"):
                model.blocks[i] = block.reference()
        for ours in self.where:
            module = model.get_submodule(ours)
            self.handles.append(module.register_forward_pre_hook(activated_input, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._hook(ours), with_kwargs=True))
        model.__dict__["adapter"] = self  # beside the model, not a child: its state dict stays the base's
        self.hooked = [model]
        return self

    def detach(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        for model in getattr(self, "hooked", []):
            model.__dict__.pop("adapter", None)
        self.hooked = []

    def _hook(self, ours: str):
        def hook(module, args, kwargs, output):
            if not self.enabled:
                return output
            return output.add_(self.delta(ours, args[0], output.shape[-1], module.training))  # a fresh tensor

        return hook

    # --- merging ---------------------------------------------------------------------------
    def merge_into(self, model: Transformer):
        """Fold the adapter into the reference model's float weights: W[rows] += B @ A * scale."""
        model.materialize()
        self.detach()
        with torch.no_grad():
            for ours, spans in self.where.items():
                w = model.get_submodule(ours).weight
                for lo, hi, key in spans:
                    part = self.parts[key]
                    w[lo:hi] += (part.B @ part.A * self.settings.scale).to(w.dtype)

    # --- files -----------------------------------------------------------------------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {}
        for name in self.names:
            part = self.parts[name.replace(".", "-")]
            sd[f"{PREFIX}{name}.lora_A.weight"] = part.A.detach().float().contiguous()
            sd[f"{PREFIX}{name}.lora_B.weight"] = part.B.detach().float().contiguous()
        return sd

    def peft_config(self) -> dict:
        s = self.settings
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base, "r": s.r,
                "lora_alpha": s.alpha, "lora_dropout": s.dropout, "target_modules": list(s.targets),
                "bias": "none", "fan_in_fan_out": self.cfg.arch == "gpt2", "inference_mode": True,
                "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None}

    def write(self, directory: Path):
        """adapter_config.json and adapter_model.safetensors into `directory` (an existing one)."""
        from safetensors.torch import save_file

        (directory / CONFIG_FILE).write_text(json.dumps(self.peft_config(), indent=1))
        save_file(self.peft_state_dict(), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def activated_input(module, args: tuple, kwargs: dict):
    """A pre-hook: the Linear is called with its input already normed and activated, so the
    adapter's hook reads that input (`args[0]`) instead of computing the norm a second time."""
    residual = kwargs.get("residual", args[3] if len(args) > 3 else None)
    return (hooked_input(args, kwargs),), ({} if residual is None else {"residual": residual})


def hooked_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """What a hooked Linear multiplies: its input after the norm and activation it was called with."""
    norm = kwargs.get("norm", args[1] if len(args) > 1 else None)
    act = kwargs.get("act", args[2] if len(args) > 2 else None)
    return activate(args[0], norm, act)


def _input_widths(cfg: Config) -> dict[str, int]:
    out = {}
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        out[b + "attn.qkv"] = cfg.d_model
        out[b + "attn.o_proj"] = cfg.n_head * cfg.head_dim
        out[b + ("mlp.up" if cfg.arch == "gpt2" else "mlp.gate_up")] = cfg.d_model
        out[b + "mlp.down"] = cfg.d_ff
    return out


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).exists() and not (path / "config.json").exists()


def read_config(directory: Path) -> dict:
    where = directory / CONFIG_FILE
    try:
        c = json.loads(where.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: cannot read the adapter's config ({e})") from None
    if not isinstance(c, dict) or c.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{where}: peft_type {c.get('peft_type')!r} is not supported (only LORA)")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        v = c.get(key)
        if isinstance(v, bool) or not isinstance(v, kind) or v <= 0:
            raise UserError(f"{where}: {key} must be a positive number, got {v!r}")
    if c.get("use_dora") or c.get("use_rslora") or c.get("bias", "none") != "none" or c.get("modules_to_save"):
        raise UserError(f"{where}: DoRA, rsLoRA, trained biases and modules_to_save are not supported")
    return c


def same_base(recorded: str | None, base: Path) -> bool:
    """Whether an adapter recorded for `recorded` (base_model_name_or_path) fits the base at `base`:
    a local path must be that base; a hub name (not a local path) is left to the shape check."""
    if not recorded:
        return True
    path = Path(recorded).expanduser()
    return not path.exists() or path.resolve() == base.resolve()


def read_adapter(directory: Path, cfg: Config, base: Path | None = None) -> Adapter:
    """The adapter in `directory` for a model of `cfg` loaded from `base`; an adapter made for another
    base (its recorded base path, a module it names or a tensor's shape) is refused in one line."""
    from safetensors.torch import load_file

    directory = Path(directory)
    c = read_config(directory)
    where = directory / CONFIG_FILE
    if base is not None and not same_base(c.get("base_model_name_or_path"), base):
        raise UserError(f"{where}: the adapter is for the base {c['base_model_name_or_path']}, not {base}")
    targets = c.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    settings = LoraSettings(c["r"], float(c["lora_alpha"]), float(c.get("lora_dropout") or 0.0), tuple(targets))
    try:
        sd = load_file(str(directory / WEIGHTS_FILE))
    except Exception as e:
        raise UserError(f"{directory / WEIGHTS_FILE}: cannot read the adapter's weights ({e})") from None
    modules = {k.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for k in sd}
    known = peft_modules(cfg)
    odd = sorted(m for m in modules if m not in known)
    if odd:
        raise UserError(f"{directory / WEIGHTS_FILE}: the adapter is for another base: this model has no module {odd[0]}")
    found = tuple(sorted(modules, key=list(known).index))  # whole names: exactly the modules the file holds
    adapter = Adapter(cfg, LoraSettings(settings.r, settings.alpha, settings.dropout, found), c.get("base_model_name_or_path"))
    adapter.settings = settings  # the targets as the config gives them
    for name in adapter.names:
        part = adapter.parts[name.replace(".", "-")]
        for m, p in (("A", part.A), ("B", part.B)):
            t = sd.get(f"{PREFIX}{name}.lora_{m}.weight")
            if t is None:
                raise UserError(f"{directory / WEIGHTS_FILE}: tensor {PREFIX}{name}.lora_{m}.weight is missing")
            if tuple(t.shape) != tuple(p.shape):
                raise UserError(f"{directory / WEIGHTS_FILE}: the adapter is for another base: {name}.lora_{m} is "
                                f"{list(t.shape)}, this model needs {list(p.shape)}")
            with torch.no_grad():
                p.copy_(t.float())
    return adapter.eval().requires_grad_(False)
