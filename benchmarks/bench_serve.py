"""Serving a mixture: routing cost, KV-cache decoding and cold-expert latency, each as a ratio.

    python benchmarks/bench_serve.py [--experts expert-335m expert-1.3b] [--n-experts 4 32]
                                     [--rounds 3] [--threads N] [--results results]
                                     [--skip routing generation latency]

1. Routing cost at inference (paper §3.2, Table 3): E routers score a prompt's first M tokens
   before one expert reads a whole sequence. For the paper's presets (4.4M routers, M = 256,
   against 335M and 1.3B experts over S = 1024 tokens; random weights, float32) and the demo's
   (config.yaml's routers and experts, its M and S): routing as a fraction of one expert forward
   pass, in FLOPs (`smalltalk.flops`, Eq. 11) and in measured time, E router forward passes over
   M - 1 tokens (Eq. 9) against one expert forward pass, timed in turn. The paper reports under
   10 %. On a CPU that other jobs share, use --threads 1: idle OpenMP threads spinning for work
   make small models several times slower.
2. Generation: tokens/s decoding 256 new tokens greedily after a 32-token prompt, with the KV
   cache and without it (every step reads the whole sequence again), in turn per round. Goal: the
   cache at least 5x faster. Models: demo-sized and the 4.4M router's shape, with S = 1024 so no
   window slides; with --results, also the trained mixture's experts (their own S).
3. First-token latency: prompt to first generated token with the expert not yet loaded (read
   from its safetensors file, which the OS has cached after the first round) and with it in the
   LRU: for a 335M expert, and with --results, for the trained mixture.

Every ratio compares numbers from the same run; medians over --rounds interleaved rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from timing import interleaved, timed

from smalltalk import flops
from smalltalk.checkpoint import load_model, save_weights
from smalltalk.config import PRESETS, ModelConfig, model_config
from smalltalk.model import LM
from smalltalk.serve import decode

REPO = Path(__file__).resolve().parents[1]
PAPER_ROUTER, PAPER_PREFIX, PAPER_SEQ_LEN = "router-4.4m", 256, 1024  # §3.1
NEW_TOKENS, PROMPT_TOKENS = 256, 32


def random_model(config: ModelConfig, seed: int = 0) -> LM:
    torch.manual_seed(seed)
    return LM(config).eval()


def demo_configs() -> tuple[ModelConfig, ModelConfig, dict]:
    """config.yaml's router and expert (V from its tokenizer.vocab_size, S from seq_len)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    vocab_size = config["tokenizer"]["vocab_size"]
    router = model_config(config, "router", vocab_size=vocab_size)
    expert = model_config(config, "expert", vocab_size=vocab_size)
    return router, expert, config


# ---- 1. routing cost ---------------------------------------------------------------------


@torch.inference_mode()
def routing_cost(
    router: ModelConfig, expert: ModelConfig, n_experts: list[int], prefix_len: int, seq_len: int,
    rounds: int,
) -> list[dict]:  # fmt: skip
    """Rows (E, FLOPs ratio, time ratio) for E routers of M tokens against an expert over S."""
    router_model, expert_model = random_model(router, 1), random_model(expert, 2)
    tokens = torch.randint(
        0, router.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0)
    )
    calls = {
        "router": lambda: router_model(tokens[:, : prefix_len - 1]),  # M - 1 tokens (Eq. 9)
        "expert": lambda: expert_model(tokens),  # (1, S): one expert pass over the sequence
    }
    seconds = interleaved(calls, rounds, warmup=expert.n_embd < 1024)  # big: the cost is stable
    router_s, expert_s = (statistics.median(seconds[name]) for name in ("router", "expert"))
    per_expert = flops.inference_flops(expert, seq_len)
    return [
        {
            "E": e,
            "flops": flops.routing_inference_flops(router, e, prefix_len) / per_expert,
            "time": e * router_s / expert_s,  # E routers, each as long as the one timed
            "router_s": router_s,
            "expert_s": expert_s,
        }
        for e in n_experts
    ]


# ---- 2. generation -----------------------------------------------------------------------


def generation_speed(models: list[LM], rounds: int, new_tokens: int = NEW_TOKENS) -> dict:
    """Tokens/s of greedy decoding with and without the KV cache, and their ratio per round."""
    vocab_size = models[0].config.vocab_size
    prompt = np.random.default_rng(0).integers(0, vocab_size, PROMPT_TOKENS).tolist()

    def run(use_cache: bool) -> list[int]:
        steps = decode(
            models, [0.0] * len(models), prompt, max_new_tokens=new_tokens,
            choose=lambda scores: int(scores.argmax()), use_cache=use_cache,
        )  # fmt: skip
        return list(steps)

    assert run(True) == run(False), "cached and uncached greedy decoding disagree"  # warms up
    seconds = interleaved(
        {"cache": lambda: run(True), "no cache": lambda: run(False)}, rounds, warmup=False
    )
    ratios = [b / a for a, b in zip(seconds["cache"], seconds["no cache"], strict=True)]
    return {
        "cache": new_tokens / statistics.median(seconds["cache"]),
        "no cache": new_tokens / statistics.median(seconds["no cache"]),
        "ratio": statistics.median(ratios),
    }


# ---- 3. first-token latency --------------------------------------------------------------


@torch.inference_mode()
def first_token_latency(load, prompt: list[int], rounds: int) -> dict:
    """Seconds from prompt to first token with the expert loaded by `load()` each time (cold)
    and with it already in memory (warm)."""
    warm_model = load()

    def first_token(model: LM) -> int:
        steps = decode([model], [0.0], prompt, max_new_tokens=1, choose=lambda lp: int(lp.argmax()))
        return next(iter(steps))

    seconds = interleaved(
        {"cold": lambda: first_token(load()), "warm": lambda: first_token(warm_model)}, rounds
    )
    cold, warm = (statistics.median(seconds[name]) for name in ("cold", "warm"))
    return {"cold": cold, "warm": warm, "ratio": cold / warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", nargs="+", default=["expert-335m", "expert-1.3b"])
    parser.add_argument("--n-experts", nargs="+", type=int, default=[4, 32], help="E")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--results", type=Path, help="a trained results directory (optional)")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["routing", "generation", "latency"]
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU, {torch.get_num_threads()} threads, float32; medians of {args.rounds} rounds\n")
    demo_router, demo_expert, demo = demo_configs()

    if "routing" not in args.skip:
        print("1. routing cost at inference, as a fraction of one expert forward pass")
        print(f"{'router':<12} {'expert':<12} {'M':>4} {'S':>5} {'E':>3} {'FLOPs':>7} "
              f"{'time':>7} {'E routers (s)':>14} {'expert (s)':>11}")  # fmt: skip
        cases = [
            (PRESETS[PAPER_ROUTER], PRESETS[name], PAPER_PREFIX, PAPER_SEQ_LEN, PAPER_ROUTER, name)
            for name in args.experts
        ]
        cases.append(
            (demo_router, demo_expert, demo["routing"]["prefix_len"], demo["seq_len"],
             "demo router", "demo expert")
        )  # fmt: skip
        for router, expert, prefix_len, seq_len, router_name, expert_name in cases:
            n_experts = args.n_experts if expert_name != "demo expert" else [4]
            rows = routing_cost(router, expert, n_experts, prefix_len, seq_len, args.rounds)
            for row in rows:
                print(
                    f"{router_name:<12} {expert_name:<12} {prefix_len:>4} {seq_len:>5} "
                    f"{row['E']:>3} {row['flops']:>7.2%} {row['time']:>7.2%} "
                    f"{row['E'] * row['router_s']:>14.4f} {row['expert_s']:>11.4f}"
                )
        print()

    if "generation" not in args.skip:
        print(f"2. greedy generation of {NEW_TOKENS} tokens after {PROMPT_TOKENS}, tokens/s")
        print(f"{'model':<26} {'params':>8} {'KV cache':>9} {'no cache':>9} {'ratio':>6}")
        cases = {
            "demo expert (S=1024)": dataclasses.replace(demo_expert, seq_len=1024),
            "demo-expert (S=1024)": dataclasses.replace(PRESETS["demo-expert"], seq_len=1024),
            "router-4.4m shape": PRESETS[PAPER_ROUTER],
        }
        for name, config in cases.items():
            model = random_model(config)
            r = generation_speed([model], args.rounds)
            print(
                f"{name:<26} {model.num_parameters() / 1e6:>7.2f}M {r['cache']:>9.0f} "
                f"{r['no cache']:>9.0f} {r['ratio']:>5.1f}x"
            )
        if args.results:
            trained = yaml.safe_load((args.results / "config.yaml").read_text())
            config = model_config(trained, "expert", vocab_size=demo_expert.vocab_size)
            model = load_model(config, args.results / "experts" / "e0" / "model.safetensors")
            r = generation_speed([model], args.rounds)
            name = f"trained e0 (S={config.seq_len}, slides)"
            print(
                f"{name:<26} {model.num_parameters() / 1e6:>7.2f}M {r['cache']:>9.0f} "
                f"{r['no cache']:>9.0f} {r['ratio']:>5.1f}x"
            )
        print()

    if "latency" not in args.skip:
        print(f"3. first-token latency after a {PROMPT_TOKENS}-token prompt, seconds")
        print(f"{'expert':<26} {'cold':>8} {'warm':>8} {'ratio':>7}")
        prompt = list(range(3, 3 + PROMPT_TOKENS))
        with tempfile.TemporaryDirectory() as folder:
            for name in [n for n in args.experts if n == "expert-335m"]:
                path = Path(folder) / f"{name}.safetensors"
                save_weights(random_model(PRESETS[name]), path)
                r = first_token_latency(lambda c=PRESETS[name], p=path: load_model(c, p, "cpu"),
                                        prompt, args.rounds)  # fmt: skip
                print(f"{name:<26} {r['cold']:>8.3f} {r['warm']:>8.3f} {r['ratio']:>6.1f}x")
        if args.results:
            from smalltalk.serve import load

            text = "In the beginning God created the heaven and the earth."

            def cold() -> float:
                mixture = load(args.results, max_experts=1)  # routers loaded, no expert yet
                return timed(lambda: mixture.generate(text, max_new_tokens=1, temperature=0))

            mixture = load(args.results, max_experts=1)
            mixture.generate(text, max_new_tokens=1, temperature=0)
            colds = [cold() for _ in range(args.rounds)]
            warms = [
                timed(lambda: mixture.generate(text, max_new_tokens=1, temperature=0))
                for _ in range(args.rounds)
            ]
            c, w = statistics.median(colds), statistics.median(warms)
            name = "trained mixture (routed)"
            print(f"{name:<26} {c:>8.3f} {w:>8.3f} {c / w:>6.1f}x")


if __name__ == "__main__":
    main()
