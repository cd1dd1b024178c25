"""Radix (prefix) cache: finished requests leave their KV slots in a token trie for later prompts to reuse."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import torch

from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator

_clock = itertools.count()


@dataclass(eq=False)
class TreeNode:
    """An edge of the trie: `key` token ids whose KV lives in slots `value`."""

    key: list[int] = field(default_factory=list)
    value: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    parent: TreeNode | None = None
    children: dict[int, TreeNode] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0


class RadixCache:
    """Prefix matching, insertion, reference locking and LRU eviction over KV slots."""

    def __init__(self, allocator: TokenToKVPoolAllocator, disable: bool = False) -> None:
        self.allocator = allocator
        self.disable = disable
        self.reset()

    def reset(self) -> None:
        self.root = TreeNode()
        self.root.lock_ref = 1
        self.evictable = 0

    def match_prefix(self, tokens: list[int]) -> tuple[torch.Tensor, TreeNode]:
        """Slots of the longest cached prefix of tokens, and the node where it ends."""
        if self.disable or not tokens:
            return torch.empty(0, dtype=torch.int64), self.root
        node, parts = self.root, []
        node.last_access = next(_clock)
        while tokens and tokens[0] in node.children:
            child = node.children[tokens[0]]
            n = _common_len(child.key, tokens)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = next(_clock)
            parts.append(child.value)
            node, tokens = child, tokens[n:]
        value = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        return value, node

    def insert(self, tokens: list[int], slots: torch.Tensor) -> int:
        """Add tokens→slots; returns how many leading tokens were already cached (their slots are the caller's)."""
        node, done = self.root, 0
        while done < len(tokens):
            head = tokens[done]
            if head not in node.children:
                child = TreeNode(key=list(tokens[done:]), value=slots[done:].clone(), parent=node)
                child.last_access = next(_clock)
                node.children[head] = child
                self.evictable += len(child.key)
                return done
            child = node.children[head]
            n = _common_len(child.key, tokens[done:])
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
        """Free at least num_tokens slots from unlocked leaves, least recently used first; returns freed count."""
        heap = [(n.last_access, id(n), n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            self.allocator.free(leaf.value)
            freed += len(leaf.key)
            self.evictable -= len(leaf.key)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut child's edge after n tokens; returns the new upper node."""
        upper = TreeNode(key=child.key[:n], value=child.value[:n], parent=child.parent, lock_ref=child.lock_ref)
        upper.last_access = child.last_access
        upper.children = {child.key[n]: child}
        child.parent.children[child.key[0]] = upper
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
