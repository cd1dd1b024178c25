"""How much of a stream's end could still grow into a stop string, found without re-reading what came before."""

from __future__ import annotations

from collections import deque


class StopAutomaton:
    """An Aho-Corasick automaton over a request's stop strings, built once and shared by its choices.

    Each character of a stream moves one state, so a chunk costs its own length, however many stop strings there
    are and however long (checking every stop string against the text's end at every chunk cost a streaming
    client with 2000 stop strings of 200 characters tens of seconds).
    """

    def __init__(self, stops: list[str]) -> None:
        self.child: dict[tuple[int, str], int] = {}
        self.depth = [0]
        self.fail = [0]
        for stop in stops:
            node = 0
            for ch in stop:
                nxt = self.child.get((node, ch))
                if nxt is None:
                    nxt = self.child[(node, ch)] = len(self.depth)
                    self.depth.append(self.depth[node] + 1)
                    self.fail.append(0)
                node = nxt
        self._link()

    def _link(self) -> None:
        # Breadth first, so a node's failure link (a shorter node) is known before its children need it.
        children: dict[int, list[tuple[str, int]]] = {}
        for (parent, ch), node in self.child.items():
            children.setdefault(parent, []).append((ch, node))
        queue = deque(node for _, node in children.get(0, []))
        while queue:
            parent = queue.popleft()
            for ch, node in children.get(parent, []):
                self.fail[node] = self.step(self.fail[parent], ch)
                queue.append(node)

    def step(self, state: int, ch: str) -> int:
        while True:
            nxt = self.child.get((state, ch))
            if nxt is not None:
                return nxt
            if state == 0:
                return 0
            state = self.fail[state]


class StopPrefixTracker:
    """Follows one growing text and knows the longest end of it that begins some stop string."""

    def __init__(self, automaton: StopAutomaton) -> None:
        self.automaton = automaton
        self.state = 0  # the node of the longest end of the text read so far that is in the automaton
        self.read = 0  # characters of the text read so far

    def held_back(self, text: str) -> int:
        """Length of the longest end of text that is the beginning of a stop string. text must extend the text of
        the previous call (a stream's cumulative output); only what is new is read."""
        state, step = self.state, self.automaton.step
        for ch in text[self.read :]:
            state = step(state, ch)
        self.state, self.read = state, max(self.read, len(text))
        return self.automaton.depth[state]
