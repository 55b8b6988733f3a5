"""Serve two models side by side and print their stats.

    python -m apportion.examples.two_models

A "tokenizer" (cheap, latency-sensitive, two instances with a 50 ms deadline) and a "scorer"
(heavier, one instance, bounded queue) share one runtime; requests arrive from several client
threads and through asyncio. Uses only the standard library.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import apportion as ap


def build_tokenizer(ctx: ap.InstanceContext):
    vocab: dict[str, int] = {}

    def tokenize(text: str) -> list[int]:
        return [vocab.setdefault(w, len(vocab)) for w in text.lower().split()]

    return tokenize


def build_scorer(ctx: ap.InstanceContext):
    def score(tokens: list[int]) -> float:
        h = hashlib.sha256(bytes(t % 256 for t in tokens))
        for _ in range(200):  # stands in for real compute
            h = hashlib.sha256(h.digest())
        return int.from_bytes(h.digest()[:4], "little") / 2**32

    return score


def main() -> None:
    rt = ap.Runtime()
    rt.add_model("tokenizer", factory=build_tokenizer, instances=2, timeout_ms=50)
    rt.add_model("scorer", factory=build_scorer, instances=1, max_queue=512)
    rt.start()

    texts = [f"request {i} about item {i % 17} and topic {i % 5}" for i in range(2000)]

    def client(offset: int) -> None:
        for text in texts[offset::4]:
            tokens = rt.submit("tokenizer", text).result()
            try:
                rt.submit("scorer", tokens).result()
            except ap.QueueFull:
                time.sleep(0.001)  # overload is refused at admission; back off and go on

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()

    async def batch() -> list[float]:
        tokens = await asyncio.gather(*(rt.infer("tokenizer", t) for t in texts[:200]))
        futs = rt.submit_many("scorer", tokens)
        return [f.result() for f in futs]

    scores = asyncio.run(batch())
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    rt.close()

    print(f"served {len(texts) * 2 + 400} requests in {elapsed:.2f} s "
          f"(mean score of the asyncio batch: {sum(scores) / len(scores):.3f})\n")
    print(rt.stats())


if __name__ == "__main__":
    main()
