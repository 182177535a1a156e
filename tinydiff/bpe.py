"""A byte-level BPE vocabulary learned from a corpus (Sennrich et al. 2016; byte-level as GPT-2, Radford et al. 2019).

Ids 0..255 are the bytes; merge i joins two ids (a, b) into id 256 + i. Merges never cross GPT-2's pre-token
boundaries (a word with its leading space, a digit run, a punctuation run, a whitespace run). The trainer works
on the distinct pre-tokens with their counts and keeps, per adjacent pair, its weighted count and the words it
occurs in: a merge rewrites only those words, so it costs the size of the words it touches, not of the corpus.
The most frequent pair comes from a heap with lazy deletion; ties go to the smallest ids (deterministic).
Encoding goes through tiktoken (`ranks` -> tiktoken.Encoding), in Rust."""
import heapq
from collections import Counter, defaultdict

VERSION = 1  # bump when learn_merges changes what it returns: prepared folders are then rebuilt
# GPT-2's pre-tokenisation pattern, as tiktoken's "gpt2" encoding spells it
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def learn_merges(texts, n_merges):
    """Learn up to n_merges merges from an iterable of strings. Returns [(a, b), ...]: merge i makes id 256 + i."""
    import regex  # installed with tiktoken (lazy: the bytes tokenizer needs neither); the stdlib `re` has no \p{L}
    counts = Counter()
    for text in texts:
        counts.update(regex.findall(PATTERN, text))  # each pre-token and how often it occurs
    words = [list(w.encode("utf-8")) for w in counts]  # a word as a list of ids, bytes at first
    freq = list(counts.values())
    pairs, where = Counter(), defaultdict(set)  # pair -> weighted count; pair -> indices of words holding it
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pairs[p] += freq[i]
            where[p].add(i)
    heap = [(-c, p) for p, c in pairs.items()]  # max-heap by count, then the smallest ids
    heapq.heapify(heap)
    token = [bytes([b]) for b in range(256)]  # id -> its bytes
    known, merges = set(token), []
    while len(merges) < n_merges and heap:
        c, p = heapq.heappop(heap)
        if -c != pairs[p]:
            continue  # stale: the count changed after this entry was pushed
        new = token[p[0]] + token[p[1]]
        if new in known:
            continue  # these bytes already have an id (reached through other merges): keep ids unique
        new_id = len(token)
        token.append(new)
        known.add(new)
        merges.append(p)
        changed = set()
        for i in where.pop(p):
            w, f = words[i], freq[i]
            for q in zip(w, w[1:]):  # the word's pairs before the merge leave the counts ...
                pairs[q] -= f
                changed.add(q)
            out, j = [], 0
            while j < len(w):  # ... the word is rewritten left to right ...
                if j + 1 < len(w) and (w[j], w[j + 1]) == p:
                    out.append(new_id)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for q in zip(out, out[1:]):  # ... and its new pairs come back in
                pairs[q] += f
                where[q].add(i)
                changed.add(q)
        for q in changed:  # the new counts of every pair touched; the old entries go stale
            if pairs[q] > 0:
                heapq.heappush(heap, (-pairs[q], q))
    return merges


def ranks(merges):
    """{token bytes: id} for all 256 + len(merges) ids: tiktoken's mergeable_ranks (a token's rank is its id)."""
    token = [bytes([b]) for b in range(256)]
    for a, b in merges:
        token.append(token[a] + token[b])
    return {t: i for i, t in enumerate(token)}
