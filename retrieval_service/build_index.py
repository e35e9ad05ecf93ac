"""Builds a retrieval index directory from a JSON-lines corpus.

    python -m retrieval_service.build_index --corpus corpus.jsonl --out INDEX_DIR --kind bm25
    python -m retrieval_service.build_index --corpus corpus.jsonl --out INDEX_DIR --kind dense \
        [--encoder MODEL_DIR] [--faiss-index flat|hnsw] [--device cuda]

Corpus rows are ``{"id": ..., "contents": "Title\\ntext"}``; any problem with a row stops the
build with an error naming the line, and leaves no partial index behind.
"""

from __future__ import annotations

import argparse
import logging

from dgpo_jax.errors import run_cli
from retrieval_service.index import INDEX_KINDS, build_index


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m retrieval_service.build_index", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--corpus", required=True, help="JSON-lines corpus with id and contents")
    parser.add_argument("--out", required=True, help="index directory to create")
    parser.add_argument("--kind", required=True, choices=INDEX_KINDS)
    parser.add_argument(
        "--encoder",
        default=None,
        help="dense: local model directory (default: bundled all-MiniLM-L6-v2; "
        "a name containing 'e5' gets the e5 prefixes and pooling)",
    )
    parser.add_argument("--device", default=None, help="dense: torch device for encoding")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="dense: passages per forward pass"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="dense: torch CPU threads while encoding (default: torch's choice)",
    )
    parser.add_argument("--faiss-index", default="flat", choices=("flat", "hnsw"))
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--k1", type=float, default=1.5, help="bm25 term-frequency saturation")
    parser.add_argument("--b", type=float, default=0.75, help="bm25 length normalisation")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    manifest = build_index(
        args.corpus,
        args.out,
        args.kind,
        encoder=args.encoder,
        device=args.device,
        batch_size=args.batch_size,
        faiss_index=args.faiss_index,
        hnsw_m=args.hnsw_m,
        k1=args.k1,
        b=args.b,
        overwrite=args.overwrite,
        show_progress=not args.no_progress,
        torch_threads=args.torch_threads,
    )
    print(
        f"built {manifest.kind} index of {manifest.num_documents} documents in {args.out} "
        f"({manifest.build_seconds:.1f} s)"
    )
    return 0


def run_main(argv: list[str] | None = None) -> None:
    """The console entry point: a corpus, output or argument error as one ``error:`` line and
    exit status 2 (``--debug`` or ``DGPO_DEBUG=1``: the traceback)."""
    run_cli(main, argv)


if __name__ == "__main__":
    run_main()
