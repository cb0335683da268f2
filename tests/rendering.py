"""What a rendered chat must tokenize to, written from its pieces independently of the templates."""


def expected(tok, pieces, labels: bool = False):
    """pieces: (text, kind, trained) with kind 't' (template text) or 'c' (content).

    The ids are those of the whole text, tokenized at once (as transformers does); a token is
    trained when any of its characters belongs to a trained piece. With `labels`, untrained
    positions hold -100 instead of a 0/1 mask.
    """
    text, flags = "", []
    for piece, _, trained in pieces:
        text += piece
        flags += [bool(trained)] * len(piece)
    ids, offsets = tok.encode_chat(text, [])
    mask = [int(any(flags[s:max(e, s + 1)])) for s, e in offsets]
    if labels:
        return ids, [i if m else -100 for i, m in zip(ids, mask)]
    return ids, mask
