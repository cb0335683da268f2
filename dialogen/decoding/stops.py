"""Stop strings found in streamed text in time linear in the text: one Knuth-Morris-Pratt
automaton per stop string.

Each automaton's state is the length of the longest prefix of its stop string that the text
ends with, so the text that could still become a stop (held back from the client) is known
without looking back at it, and a character costs O(1) amortized per stop string. Building the
tables costs O(total stop length) once per reply; that total is capped by
`settings.MAX_STOP_CHARS`.
"""

from __future__ import annotations


def prefix_table(s: str) -> list[int]:
    """table[i]: the length of the longest proper prefix of s[: i + 1] that is also its suffix."""
    table = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        c = s[i]
        while k and s[k] != c:
            k = table[k - 1]
        if s[k] == c:
            k += 1
        table[i] = k
    return table


class StopMatcher:
    """Follows a text as it grows: `update(text)` matches only the characters after the ones
    already seen and returns where the text must be cut (the earliest start of a stop string in
    the update that found one; None until then); `hold` is how many of its last characters could
    begin a stop string."""

    def __init__(self, stops: list[str], tables: list[list[int]] | None = None):
        self.stops = [s for s in stops if s]
        self.tables = tables if tables is not None else [prefix_table(s) for s in self.stops]
        self.states = [0] * len(self.stops)
        self.seen = ""
        self.cut: int | None = None

    def fresh(self) -> "StopMatcher":
        """A matcher for another text, sharing the tables."""
        return StopMatcher(self.stops, self.tables)

    def update(self, text: str) -> int | None:
        if self.cut is not None:
            return self.cut
        if not text.startswith(self.seen):  # the text changed behind us (a decoder may re-read bytes): afresh
            self.states, self.seen = [0] * len(self.stops), ""
        start, new = len(self.seen), text[len(self.seen):]
        ends = []
        for j, (s, table) in enumerate(zip(self.stops, self.tables)):
            k, n = self.states[j], len(s)
            for i, c in enumerate(new):
                while k and s[k] != c:
                    k = table[k - 1]
                if s[k] == c:
                    k += 1
                if k == n:  # the first occurrence in this update: the earliest start for this stop
                    ends.append(start + i + 1 - n)
                    break
            self.states[j] = k
        self.seen = text
        if ends:
            self.cut = min(ends)
        return self.cut

    @property
    def hold(self) -> int:
        return max(self.states, default=0) if self.cut is None else 0
