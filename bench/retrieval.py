"""Retrieval benchmark: search latency of the embedded vector index (Qdrant local folder) with many documents.

Builds --docs documents x --chunks chunks of random unit vectors (--dim 384, MiniLM's size) through
`VectorIndex.upsert_chunks`, in the collection-per-document layout of the embedded mode, then times searches within
one document (the paper's setting) and across --across documents, and the end-to-end retrieve: embedding the
question with the real embedder, then searching; and the extractive compressor's size ratios (compressed text /
the top_k passages, in characters and tokens) on sample queries. Prints JSON and writes it under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, machine, percentile, write_json
from registry.config import Settings
from registry.vector_index import VectorIndex

TENANT = "bench"
# Varied sentences (the extractive compressor dedupes repeats); 13 of them are about 256 tokens, a real chunk's size.
SUBJECTS = ("The harbour master", "A glass maker", "The river ferry", "An old observatory", "The trade guild",
            "A village baker", "The northern mine", "A travelling scholar")
VERBS = ("repaired", "described", "measured", "sold", "painted", "recorded", "guarded", "visited")
OBJECTS = ("the cobalt vases", "a star catalogue", "the barley harvest", "the winter festival", "the tariff ledger",
           "a silver compass", "the eastern bridge", "the comet's path")
PLACES = ("near the quiet river bank at dawn", "in the capital of Lanmark", "on the island of Perrin",
          "below Mount Tessel", "during the long spring rains", "beside the old harbour wall")
SENTENCES_PER_CHUNK = 13
COMPRESS_K = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=40, help="chunks per document")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--across", type=int, default=10, help="documents per cross-document search")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--queries", type=int, default=500, help="timed searches per kind")
    parser.add_argument("--e2e-queries", type=int, default=100, help="timed end-to-end retrieves (with embedding)")
    parser.add_argument("--compress-queries", type=int, default=50, help="queries whose passages are compressed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for the embedder")
    parser.add_argument("--short", action="store_true", help="smoke mode: a small index and few queries")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.short:
        args.docs, args.chunks, args.queries, args.e2e_queries, args.compress_queries = 20, 8, 30, 5, 5
    args.across = min(args.across, args.docs)
    return args


def unit_vector(rng: random.Random, dim: int) -> list[float]:
    """A random direction on the unit sphere."""
    vector = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = sum(x * x for x in vector) ** 0.5
    return [x / norm for x in vector]


def chunk_text(rng: random.Random, document_id: int, index: int) -> str:
    """A synthetic chunk: distinct sentences from the vocabulary above."""
    sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)} "
                 f"in year {rng.randrange(1000, 2000)} of record {document_id}.{index}." for _ in
                 range(SENTENCES_PER_CHUNK)]
    return " ".join(sentences)


def build(index: VectorIndex, args: argparse.Namespace, rng: random.Random) -> float:
    """Index every document; returns the seconds it took."""
    start = time.perf_counter()
    for document_id in range(1, args.docs + 1):
        chunks = [{"index": i, "text": chunk_text(rng, document_id, i), "token_start": 256 * i,
                   "token_end": 256 * (i + 1)} for i in range(args.chunks)]
        index.upsert_chunks(TENANT, document_id, chunks, [unit_vector(rng, args.dim) for _ in chunks])
    return time.perf_counter() - start


def timed(calls: int, call: Callable[[int], object], warmup: int = 5) -> dict[str, float]:
    """p50/p99/mean milliseconds of `calls` calls (after a few untimed ones)."""
    for i in range(warmup):
        call(i)
    samples = []
    for i in range(calls):
        start = time.perf_counter()
        call(i)
        samples.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": round(percentile(samples, 50), 3), "p99_ms": round(percentile(samples, 99), 3),
            "mean_ms": round(sum(samples) / len(samples), 3), "n": calls}


def search_latency(index: VectorIndex, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """Latency of searches within one document and across `--across` documents (random queries)."""
    queries = [unit_vector(rng, args.dim) for _ in range(64)]
    picks = [rng.sample(range(1, args.docs + 1), args.across) for _ in range(64)]
    within = timed(args.queries, lambda i: index.search(TENANT, [picks[i % 64][0]], queries[i % 64], args.top_k))
    across = timed(args.queries, lambda i: index.search(TENANT, picks[i % 64], queries[i % 64], args.top_k))
    return {"within_document": within, f"across_{args.across}_documents": across}


def end_to_end(index: VectorIndex, args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Embedding the question with the real embedder, then searching one document (what a RAG query pays)."""
    from engines.embedder import resolve_device, shared_embedder
    from server.services.retrieval import Retriever

    embedder = shared_embedder(settings)
    load_start = time.perf_counter()
    embedder.embed(["warm-up"])
    load_s = time.perf_counter() - load_start
    questions = [f"What did the traveller find in chapter {i} of the story?" for i in range(args.e2e_queries + 5)]
    retriever = Retriever(index, embedder)
    retrieve = timed(args.e2e_queries, lambda i: retriever.retrieve(TENANT, [1 + i % args.docs], questions[i],
                                                                     args.top_k))
    embed = timed(args.e2e_queries, lambda i: embedder.embed([questions[i]]))
    return {"retrieve_within_document": retrieve, "embed_question": embed, "embedder_load_s": round(load_s, 3),
            "embedder": settings.embedding_model or "all-MiniLM-L6-v2 (bundled)",
            "device": resolve_device(embedder.device)}


def compression(index: VectorIndex, args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Extractive compression of the top_k passages of sample queries: compressed / uncompressed size."""
    from transformers import AutoTokenizer

    from engines.compressor import extract
    from engines.embedder import shared_embedder
    from server.services.retrieval import Retriever

    embedder = shared_embedder(settings)
    tokenizer = AutoTokenizer.from_pretrained(str(embedder.model_path))
    retriever = Retriever(index, embedder)
    chars, tokens = [], []
    for i in range(args.compress_queries):
        question = f"What did {SUBJECTS[i % len(SUBJECTS)].lower()} do with {OBJECTS[i % len(OBJECTS)]}?"
        texts = [p.text for p in retriever.retrieve(TENANT, [1 + i % args.docs], question, args.top_k)]
        short = extract(embedder, question, texts, COMPRESS_K).text
        chars.append(len(short) / len(" ".join(texts)))
        tokens.append(len(tokenizer(short)["input_ids"]) / len(tokenizer(" ".join(texts))["input_ids"]))
    return {"method": "extractive", "passages": args.top_k, "sentences_kept": COMPRESS_K,
            "queries": args.compress_queries, "char_ratio": round(sum(chars) / len(chars), 4),
            "token_ratio": round(sum(tokens) / len(tokens), 4), "tokenizer": "the embedder's (MiniLM WordPiece)"}


def run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    """Build, reopen (what a server pays on its first RAG query), measure."""
    settings = Settings(data_dir=data_dir)
    rng = random.Random(0)
    with VectorIndex.open(settings) as index:
        build_s = build(index, args, rng)
    start = time.perf_counter()
    with VectorIndex.open(settings) as index:
        open_s = time.perf_counter() - start
        result = {"docs": args.docs, "chunks_per_doc": args.chunks, "points": args.docs * args.chunks,
                  "dim": args.dim, "top_k": args.top_k, "layout": "collection per document (embedded local mode)",
                  "build_s": round(build_s, 3), "open_s": round(open_s, 3), **search_latency(index, args, rng)}
        result["end_to_end"] = end_to_end(index, args, settings)
        result["compression"] = compression(index, args, settings)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print and write its JSON."""
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kmserve-bench-") as tmp:
        result = run(args, Path(tmp))
    result["machine"] = machine()
    default = RESULTS_DIR / "tmp" / "retrieval_short.json" if args.short else RESULTS_DIR / "retrieval.json"
    result["out"] = str(write_json(args.out or default, result))
    print(json.dumps(result, indent=2, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
