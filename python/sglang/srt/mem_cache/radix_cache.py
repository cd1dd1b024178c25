"""Radix (prefix) cache: finished requests leave their KV slots in a token trie for later prompts to reuse.

With a page size P > 1 the trie works in whole pages: every edge holds a multiple of P tokens, a match is cut to
whole pages, and only whole pages are inserted, so the slots it hands back keep a request's pages page-aligned and
eviction frees whole pages. Children are keyed by their first page of tokens (their first token when P is 1).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import torch

from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator

_clock = itertools.count()

# A child's key in its parent: its first token, or with pages its first page of tokens (two edges may share a first
# token but not a first page, since a match never ends inside a page).
ChildKey = int | tuple[int, ...]


@dataclass(eq=False)
class TreeNode:
    """An edge of the trie: `key` token ids whose KV lives in slots `value`."""

    key: list[int] = field(default_factory=list)
    value: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    parent: TreeNode | None = None
    children: dict[ChildKey, TreeNode] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0


class RadixCache:
    """Prefix matching, insertion, reference locking and LRU eviction over KV slots, in the allocator's pages."""

    def __init__(self, allocator: TokenToKVPoolAllocator, disable: bool = False) -> None:
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.disable = disable
        self.reset()

    def reset(self) -> None:
        self.root = TreeNode()
        self.root.lock_ref = 1
        self.evictable = 0

    def match_prefix(self, tokens: list[int]) -> tuple[torch.Tensor, TreeNode]:
        """Slots of the longest cached prefix of tokens (whole pages), and the node where it ends."""
        if self.disable:
            return torch.empty(0, dtype=torch.int64), self.root
        if self.page_size > 1:
            tokens = tokens[: self.page_aligned(len(tokens))]
        if not tokens:
            return torch.empty(0, dtype=torch.int64), self.root
        node, parts = self.root, []
        node.last_access = next(_clock)
        while tokens and self._child_key(tokens) in node.children:
            child = node.children[self._child_key(tokens)]
            n = self._match_len(child.key, tokens)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = next(_clock)
            parts.append(child.value)
            node, tokens = child, tokens[n:]
        value = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        return value, node

    def insert(self, tokens: list[int], slots: torch.Tensor) -> int:
        """Add tokens→slots; returns how many leading tokens were already cached (their slots are the caller's).

        Only whole pages are inserted: the tokens after the last whole page are left out and their slots stay the
        caller's to free (a partly written page is never shared)."""
        if self.page_size > 1:
            tokens = tokens[: self.page_aligned(len(tokens))]
        node, done = self.root, 0
        while done < len(tokens):
            head = self._child_key(tokens, done)
            if head not in node.children:
                child = TreeNode(key=list(tokens[done:]), value=slots[done : len(tokens)].clone(), parent=node)
                child.last_access = next(_clock)
                node.children[head] = child
                self.evictable += len(child.key)
                return done
            child = node.children[head]
            n = self._match_len(child.key, tokens[done:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = next(_clock)
            node, done = child, done + n
        return done

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Protect node and its ancestors from eviction while a request uses them."""
        while node is not self.root and node is not None:
            if node.lock_ref == 0:
                self.evictable -= len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root and node is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable += len(node.key)
            node = node.parent

    def evictable_size(self) -> int:
        return self.evictable

    def total_size(self) -> int:
        return sum(len(n.key) for n in self._nodes())

    def evict(self, num_tokens: int) -> int:
        """Free at least num_tokens slots (whole pages) from unlocked leaves, least recently used first; returns
        freed count."""
        heap = [(n.last_access, id(n), n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            self.allocator.free(leaf.value)
            freed += len(leaf.key)
            self.evictable -= len(leaf.key)
            parent = leaf.parent
            del parent.children[self._child_key(leaf.key)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def page_aligned(self, n: int) -> int:
        """n rounded down to whole pages."""
        return n - n % self.page_size

    def _child_key(self, tokens: list[int], start: int = 0) -> ChildKey:
        """Key of the edge that tokens[start:] would follow."""
        return tokens[start] if self.page_size == 1 else tuple(tokens[start : start + self.page_size])

    def _match_len(self, key: list[int], tokens: list[int]) -> int:
        """Common prefix length of key and tokens in whole pages (an edge is never cut inside a page)."""
        return self.page_aligned(_common_len(key, tokens))

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut child's edge after n tokens (whole pages); returns the new upper node."""
        upper = TreeNode(key=child.key[:n], value=child.value[:n], parent=child.parent, lock_ref=child.lock_ref)
        upper.last_access = child.last_access
        upper.children = {self._child_key(child.key, n): child}
        child.parent.children[self._child_key(child.key)] = upper
        child.key, child.value, child.parent = child.key[n:], child.value[n:], upper
        return upper

    def _nodes(self) -> list[TreeNode]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out


def _common_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
