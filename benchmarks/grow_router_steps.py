"""How long a grown router trains decides what it takes: its corpus's share against the run's.

    python benchmarks/grow_router_steps.py --results results [--entry 0]
                                           [--steps 100 200 300 350 400 800] [--threads 2]

For a mixture that grew (`grow` in its config, the workflow run to the end), trains the router of
grow entry `--entry` again for each number of steps, exactly as the workflow does
(`smalltalk.grow.grown_router_plan`, with `grow.router_steps` overridden), into a temporary
folder, and measures on the validation splits, never the test split: the share of the new
corpus's validation sequences whose prefix it fits better than every router of the run (they
go to its expert), and the share of the run's own validation sequences it takes from them
(argmin over prefix NLL at the training prefix M, as at inference). Prints the trainings' logs,
then a Markdown table.
The run's files are read only.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from smalltalk.checkpoint import load_model
from smalltalk.config import load_config, model_config, train_config
from smalltalk.evaluate import read_tokens
from smalltalk.grow import grown_router_plan
from smalltalk.layout import mixture_files
from smalltalk.scoring import prefix_nll
from smalltalk.tokens import token_matrix
from smalltalk.train import fit


def tokens_of(files: list[Path]) -> np.ndarray:
    return token_matrix(read_tokens(files, ["tokens"]).column("tokens"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--entry", type=int, default=0, help="the grow entry k (expert E + k)")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 200, 300, 350, 400, 800])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    files = mixture_files(args.results)
    config = load_config(args.results / "config.yaml")
    n_experts = config["routing"]["n_experts"]
    index, prefix_len = n_experts + args.entry, config["routing"]["prefix_len"]
    import sentencepiece as spm

    vocab_size = spm.SentencePieceProcessor(model_file=str(files.tokenizer)).get_piece_size()
    router_config = model_config(config, "router", vocab_size=vocab_size)
    tokens = args.results / "tokens"
    train = sorted(tokens.glob(f"train/g{args.entry}c*.parquet"))
    val_new = tokens_of(sorted(tokens.glob(f"val/g{args.entry}c*.parquet")))
    val_run = tokens_of(sorted(tokens.glob("val/c*.parquet")))
    if not train or not len(val_new):
        raise SystemExit(f"{args.results}: no tokens of grow entry {args.entry}; run the workflow")
    run_routers = [
        load_model(router_config, path, "cpu") for path in files.routers(range(n_experts))
    ]
    best_new = np.min([prefix_nll(router, val_new, prefix_len) for router in run_routers], axis=0)
    best_run = np.min([prefix_nll(router, val_run, prefix_len) for router in run_routers], axis=0)

    em_summary = args.results / "routers" / "final" / "em.json"
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for steps in args.steps:
            plan = grown_router_plan(config, index, em_summary, train, steps=steps)
            training = train_config(
                config, "router", steps=plan.steps, seed_offset=plan.seed_offset,
                first_round=True, threads=args.threads,
            )  # fmt: skip
            weights = Path(work) / f"router-{steps}.safetensors"
            fit(
                router_config,
                training,
                train,
                Path(work) / f"router-{steps}",
                role="router",
                seq_ids=plan.seq_ids,
                prefix_len=plan.prefix_len,
                weights_path=weights,
            )
            router = load_model(router_config, weights, "cpu")
            own = float((prefix_nll(router, val_new, prefix_len) < best_new).mean())
            taken = float((prefix_nll(router, val_run, prefix_len) < best_run).mean())
            rows.append((steps, own, taken))
            print(f"{steps} steps: {own:.1%} of its corpus, {taken:.1%} of the run's", flush=True)
    default = grown_router_plan(config, index, em_summary, train).steps
    print(
        f"\nGrown router of `{config['grow'][args.entry]['name']}` (default: {default} steps), "
        "validation splits:\n\n| steps | its corpus's sequences it takes | the run's it takes |\n"
        "|---:|---:|---:|"
    )
    for steps, own, taken in rows:
        print(f"| {steps} | {own:.1%} | {taken:.1%} |")


if __name__ == "__main__":
    main()
