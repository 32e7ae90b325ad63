# The results layout and the input functions of the rules; logic lives in smalltalk/.
import os
from types import SimpleNamespace

from smalltalk.config import SPLITS
from smalltalk.data import plan_chunks, plan_grown_chunks
from smalltalk.layout import final_router_paths

CHUNKS = {
    chunk.name: chunk
    for chunk in plan_chunks(config["inputs"], config["files_per_chunk"])
}
# Corpora added later (`grow`): entry k's chunks g{k}c..., its expert and router E + k. The run's
# own stages (EM, shards, the E experts, the dense baseline) read CHUNKS only, so growing leaves
# them untouched; tokenizing and evaluation cover every chunk.
GROWN_CHUNKS = [
    {
        chunk.name: chunk
        for chunk in plan_grown_chunks(
            position, entry["inputs"], config["files_per_chunk"]
        )
    }
    for position, entry in enumerate(config["grow"])
]
ALL_CHUNKS = {
    name: chunk for chunks in [CHUNKS, *GROWN_CHUNKS] for name, chunk in chunks.items()
}
# Evaluation jobs take `eval.chunks_per_job` chunks of one corpus: parts p... of the run's corpus,
# g{k}p... of grow entry k's, so a grown corpus adds parts and changes none.
EVAL_PARTS = {
    f"{prefix}p{index:05d}": names[start : start + config["eval"]["chunks_per_job"]]
    for prefix, names in [("", list(CHUNKS))]
    + [(f"g{k}", list(chunks)) for k, chunks in enumerate(GROWN_CHUNKS)]
    for index, start in enumerate(
        range(0, len(names), config["eval"]["chunks_per_job"])
    )
}


ROUNDS = range(config["routing"]["rounds"] + 1)  # r = 0 (random), 1..T at most
EXPERTS = range(config["routing"]["n_experts"])
# Dense baselines on the mixture's whole training budget, beside the equal-token one.
BASELINES = list(config["training"]["baselines"])
GROWN_EXPERTS = range(len(EXPERTS), len(EXPERTS) + len(config["grow"]))
ALL_EXPERTS = range(len(EXPERTS) + len(GROWN_EXPERTS))
# smalltalk trains router LMs by EM; the baselines are fitted once on the EM sample instead.
METHOD = config["routing"]["method"]
LEARNED_ROUTERS = METHOD == "smalltalk"
FIGURES = [
    "perplexity_vs_flops",
    "expert_load",
    "segment_perplexity",
    "prefix_sensitivity",
    *(["em_convergence"] if LEARNED_ROUTERS else []),
    "segment_source",
]
EVAL_TABLES = ["overall", "per_segment", "per_source", "segment_source", "load"]


wildcard_constraints:
    chunk=r"(g\d+)?c\d+",
    part=r"(g\d+)?p\d+",
    kept=r"\d+(-\d+)*",
    r=r"\d+",
    e=r"\d+",
    split="|".join(SPLITS),
    method="tfidf_kmeans|random|source",


def R(path):
    """A path under the results root."""
    return os.path.join(config["results"], path)


def get_tokens_dir(wildcards, output):
    """tokens/ from tokens/train/{chunk}.parquet."""
    return os.path.dirname(os.path.dirname(output.train))


def get_chunk_files(wildcards):
    return list(ALL_CHUNKS[wildcards.chunk].files)


def get_tokenizer_model(wildcards=None):
    return config["tokenizer"]["model"] or R("tokenizer/spm.model")


def get_tokenizer_sample(wildcards):
    from smalltalk.tokenizer import sample_files

    files = [path for chunk in CHUNKS.values() for path in chunk.files]
    return sample_files(files, config["tokenizer"]["sample_files"])


def get_token_files(split, chunks=CHUNKS):
    return expand(R("tokens/{split}/{chunk}.parquet"), split=split, chunk=chunks)


def get_grown_token_files(split):
    """An input function: the split's token files of grown expert e's corpus."""
    return lambda wildcards: get_token_files(split, GROWN_CHUNKS[get_grown(wildcards)])


def get_grown(wildcards):
    """The grow entry of grown expert (or router) `e`: its position k = e - E."""
    return int(wildcards.e) - len(EXPERTS)


def get_grow_entry(wildcards):
    """Grown expert e's `grow` entry (a params function: its settings re-run its jobs)."""
    return config["grow"][get_grown(wildcards)]


def is_grown(wildcards):
    return int(wildcards.e) >= len(EXPERTS)


def get_em_token_files(split):
    """The split's files of at most routing.em_chunks chunks, spread evenly: EM's sample."""
    from smalltalk.tokenizer import sample_files

    chunks = sample_files(list(CHUNKS), config["routing"]["em_chunks"])
    return expand(R("tokens/{split}/{chunk}.parquet"), split=split, chunk=chunks)


def get_router_training_inputs(wildcards):
    """Router e of round r trains on its share of block r-1, from its round r-1 weights."""
    r = int(wildcards.r)
    inputs = {
        "block": R(f"routers/blocks/b{r - 1}.parquet"),
        "assignment": R(f"routers/r{r - 1}/assignment.parquet"),
        "tokenizer": get_tokenizer_model(),
    }
    if r > 1:
        inputs["init"] = R(f"routers/r{r - 1}/e{wildcards.e}.safetensors")
    return inputs


def get_router_init_flag(wildcards, input):
    """Arguments, each shell-quoted by `{params.init:q}`."""
    return ["--init", input.init] if "init" in input.keys() else []


def get_router_work_dir(wildcards, output):
    """routers/r{r}/e{e}/ beside routers/r{r}/e{e}.safetensors: metrics, checkpoints."""
    return os.path.splitext(output.weights)[0]


def get_assignment_inputs(wildcards):
    r = int(wildcards.r)
    inputs = {
        "block": R(f"routers/blocks/b{r}.parquet"),
        "probe": R("routers/probe.parquet"),
        "scores": expand(R("routers/r{r}/scores/e{e}.parquet"), r=r, e=EXPERTS),
        "probe_scores": expand(R("routers/r{r}/probe/e{e}.parquet"), r=r, e=EXPERTS),
    }
    if r > 1:
        inputs["previous_probe_scores"] = expand(
            R("routers/r{r}/probe/e{e}.parquet"), r=r - 1, e=EXPERTS
        )
    return inputs


def get_previous_probe_flag(wildcards, input):
    if "previous_probe_scores" not in input.keys():
        return []
    return ["--previous-probe-scores", *input.previous_probe_scores]


def get_em_rounds(wildcards=None):
    """The EM rounds that ran, 0..r: round r is the first whose diagnostics end EM
    (routing.stop, else round T). assign_round is a checkpoint, so each round's diagnostics
    are read once it has run, and round r+1 is scheduled only if EM goes on after it."""
    from smalltalk.em import em_stop_reason, read_diagnostics

    routing = config["routing"]
    stop = routing["stop"]
    if stop["changed_below"] is None and stop["nll_min_improvement"] is None:
        return ROUNDS  # the fixed schedule: every round, planned before any has run
    rows = []
    for r in ROUNDS[1:]:
        rows += read_diagnostics([checkpoints.assign_round.get(r=r).output.diagnostics])
        if em_stop_reason(rows, max_rounds=routing["rounds"], stop=stop):
            break
    return range(len(rows) + 1)


def get_em_files(pattern, first=0):
    """An input function: `pattern` (with {r}) for every EM round that ran, from `first`."""
    return lambda wildcards: expand(R(pattern), r=get_em_rounds()[first:])


def get_last_em_routers(wildcards):
    """The E router LMs of the round that ended EM."""
    return expand(R("routers/r{r}/e{e}.safetensors"), r=get_em_rounds()[-1], e=EXPERTS)


def get_final_routers():
    """The E router LMs of the round that ended EM, or the one fitted baseline router."""
    return final_router_paths(config["results"], METHOD, len(EXPERTS))


def get_all_routers():
    """The final routers and the grown ones: what serving the mixture routes with."""
    return final_router_paths(config["results"], METHOD, len(ALL_EXPERTS))


def get_shard_files():
    return expand(R("shards/expert={e}/{chunk}.parquet"), e=EXPERTS, chunk=CHUNKS)


def get_expert_shards(wildcards):
    """Expert e's training data: its shard; a grown expert's corpus (train split) and what its
    router takes of the run's own train split."""
    if is_grown(wildcards):
        captured = expand(
            R("grow/e{e}/captured/{chunk}.parquet"), e=wildcards.e, chunk=CHUNKS
        )
        return [*get_grown_token_files("train")(wildcards), *captured]
    return expand(R("shards/expert={e}/{chunk}.parquet"), e=wildcards.e, chunk=CHUNKS)


def get_expert_validation(wildcards):
    """Expert e's validation curves: its routed part of the validation split, or a grown
    expert's own corpus's validation split."""
    if is_grown(wildcards):
        return get_grown_token_files("val")(wildcards)
    return R(f"eval/val/expert={wildcards.e}.parquet")


def get_branch_point(wildcards=None):
    """The shared trunk's checkpoint that the experts and the dense baseline go on from (BTM's
    seed phase, training.branch_steps); none when they train from scratch, as in the paper.
    """
    steps = config["training"]["branch_steps"]
    return [R(f"trunk/ckpt/step-{steps:08d}/state.pt")] if steps else []


def get_branch_flag(wildcards, input):
    return ["--branch-from", os.path.dirname(input.branch[0])] if input.branch else []


def get_model_dir(wildcards, output):
    """experts/e{e}/ or dense/: metrics, checkpoints and summary beside the weights."""
    return os.path.dirname(output.weights)


def get_dense(name):
    """The dense baseline's model.safetensors, summary.json or metrics.parquet: trained by
    this run, or by the run that training.dense_from names."""
    folder = config["training"]["dense_from"]
    return os.path.join(folder, name) if folder else R(f"dense/{name}")


def get_expert_models():
    return expand(R("experts/e{e}/model.safetensors"), e=ALL_EXPERTS)


def get_part_tokens(wildcards):
    """The token files of an evaluation part, in order."""
    return get_token_files(wildcards.split, EVAL_PARTS[wildcards.part])


def get_eval_files(pattern, split):
    """`pattern` (with {part}) for every evaluation part of the split."""
    return expand(R(pattern), split=split, part=EVAL_PARTS)


def get_route_files(wildcards):
    """A part's routing costs, one file per router LM (experts' order) or the fitted router's."""
    routers = expand("e{e}", e=ALL_EXPERTS) if LEARNED_ROUTERS else [METHOD]
    return expand(
        R("eval/{split}/routes/{router}/{part}.parquet"),
        split=wildcards.split,
        router=routers,
        part=wildcards.part,
    )


def get_eval_router(wildcards):
    if LEARNED_ROUTERS:
        return R(f"routers/final/{wildcards.router}.safetensors")
    return R(f"routers/{METHOD}.npz")


def get_expert_score_files(wildcards):
    return expand(
        R("eval/{split}/scores/e{e}/{part}.parquet"),
        split=wildcards.split,
        e=ALL_EXPERTS,
        part=wildcards.part,
    )


def get_scored_weights(wildcards):
    if wildcards.model == "dense":
        return get_dense("model.safetensors")
    if wildcards.model in BASELINES:
        return R(f"baselines/{wildcards.model}/model.safetensors")
    return R(f"experts/{wildcards.model}/model.safetensors")


def get_scored_architecture(wildcards):
    """models.dense_large for the larger dense baseline, models.expert for every other model."""
    return "dense_large" if wildcards.model == "dense_large" else "expert"


def get_baseline_score_files(wildcards):
    """A part's scores by each dense baseline on the mixture's budget, `BASELINES`' order."""
    return expand(
        R("eval/{split}/scores/{model}/{part}.parquet"),
        split=wildcards.split,
        model=BASELINES,
        part=wildcards.part,
    )


def get_baseline_scores_flag(wildcards, input):
    """--baseline-scores NAME=FILE ..., each argument shell-quoted by `{params.baselines:q}`."""
    pairs = [f"{name}={path}" for name, path in zip(BASELINES, input.baselines)]
    return ["--baseline-scores", *pairs] if pairs else []


def get_baseline_summaries_flag(wildcards, input):
    pairs = [f"{name}={path}" for name, path in zip(BASELINES, input.baselines)]
    return ["--baseline-summaries", *pairs] if pairs else []


BEFORE_GROWING = "-".join(
    map(str, EXPERTS)
)  # the subset of a grown mixture's first E experts


def get_subset_flag(wildcards):
    """The experts kept, from a subset's name 0-2."""
    return ["--experts", wildcards.kept.replace("-", ",")]


def get_subset_eval_files(wildcards):
    return expand(
        R("eval/{split}/subsets/{kept}/{part}.parquet"),
        split=wildcards.split,
        kept=wildcards.kept,
        part=EVAL_PARTS,
    )


def get_summary_dir(wildcards, output):
    return os.path.dirname(output[0])


def get_results_dir(wildcards, output):
    """The results root, from harness/scores.parquet: where the trained mixture is read."""
    return os.path.dirname(os.path.dirname(output.scores))


def get_router_summaries(wildcards):
    if not LEARNED_ROUTERS:
        return []
    rounds = get_em_rounds()[1:]
    return expand(R("routers/r{r}/e{e}/summary.json"), r=rounds, e=EXPERTS)


def get_em_scores(wildcards):
    if not LEARNED_ROUTERS:
        return []
    rounds = get_em_rounds()[1:]
    return expand(R("routers/r{r}/scores/e{e}.parquet"), r=rounds, e=EXPERTS)


RESULTS_TABLES = {
    "overall": "Test perplexity by routing prefix length",
    "per_segment": "Per segment",
    "per_source": "Per source",
    "grow": "Grown: after against before growing, per corpus and source (routing prefix M)",
}


def get_results_tables(wildcards=None):
    """Tables of the results page; the growing table where the mixture grew."""
    names = [name for name in RESULTS_TABLES if name != "grow" or GROWN_EXPERTS]
    return {name: R(f"eval/summary/{name}.parquet") for name in names}


def get_results_table_flags(wildcards, input):
    return [
        argument
        for name, title in RESULTS_TABLES.items()
        if name in input.keys()
        for argument in ("--table", f"{title}={input[name]}")
    ]


def get_ledger_tables(wildcards=None):
    """Tables of the costs page: communication only where routers exchange scores."""
    tables = {
        "flops": R("ledger/flops.parquet"),
        "paper": R("ledger/paper_table3.parquet"),
    }
    if LEARNED_ROUTERS:
        tables["communication"] = R("ledger/communication.parquet")
    return tables


def get_ledger_table_flags(wildcards, input):
    titles = {
        "flops": "FLOPs of this run (Eq. 10-16)",
        "communication": "Communication: bytes of scores exchanged (App. A.4)",
        "paper": "The paper, Table 3, recomputed from Tables 1-2",
    }
    return [
        argument
        for name, title in titles.items()
        if name in input.keys()
        for argument in ("--table", f"{title}={input[name]}")
    ]


def get_test_evaluation_parts():
    """Every file the test split's evaluation writes part by part: each router's routes, each
    model's scores, the merged rows (and, for a grown mixture, its rows before growing).
    """
    parts = [SimpleNamespace(split="test", part=part) for part in EVAL_PARTS]
    pieces = [
        path
        for part in parts
        for path in (
            *get_route_files(part),
            *get_expert_score_files(part),
            R(f"eval/test/scores/dense/{part.part}.parquet"),
            *get_baseline_score_files(part),
        )
    ]
    before_growing = f"eval/{{split}}/subsets/{BEFORE_GROWING}/{{part}}.parquet"
    return [
        *pieces,
        *get_eval_files("eval/{split}/{part}.parquet", "test"),
        *(get_eval_files(before_growing, "test") if GROWN_EXPERTS else []),
    ]


def get_intermediate_outputs():
    """The files jobs write for later jobs from the shards on (the shards, their routing scores,
    the evaluation's parts, lm-eval's task and scores), made targets of the run as well.

    Snakemake does not rebuild a missing input whose consumers' outputs are there and newer
    than their other inputs (snakemake#1978), and a job that starts removes its outputs first:
    a run killed in a forced re-shard left `shards/expert=*/c00001.parquet` missing for good,
    the experts as they were and `explain` reporting on half the shards. As targets, a missing
    one is rebuilt and, newer than what read it, re-runs its consumers, so a run resumed after
    a kill ends as the uninterrupted one would. Not here: EM's rounds (routers/r{r}/...), known
    only once EM has run, and the outputs of jobs that have another output among the targets
    (a target job with any output missing runs again).
    """
    return [
        *get_shard_files(),
        *expand(R("segmentation/scores/{chunk}.parquet"), chunk=CHUNKS),
        *get_test_evaluation_parts(),
        R("harness/continuation_choice/continuation_choice.jsonl"),
        R("harness/continuation_choice/continuation_choice.yaml"),
        R("harness/scores.parquet"),
        R("harness/lm_eval.json"),
    ]


def get_final_outputs():
    """Every result, what serving the mixture reads (smalltalk.load) and what `explain` reads
    (the shards), so that a deleted model, config or shard is rebuilt rather than found missing
    when the mixture is loaded; and the files later jobs read (get_intermediate_outputs).
    """
    return [
        *get_intermediate_outputs(),
        get_tokenizer_model(),
        *get_all_routers(),
        *get_expert_models(),
        get_dense("model.safetensors"),
        *expand(R("baselines/{baseline}/model.safetensors"), baseline=BASELINES),
        *get_token_files(SPLITS, ALL_CHUNKS),
        R("tokens/summary.tsv"),
        *(
            [
                R("routers/diagnostics.parquet"),
                R("routers/contingency.parquet"),
                R("ledger/communication.parquet"),
            ]
            if LEARNED_ROUTERS
            else []
        ),
        R("segmentation/check.json"),
        *expand(R("eval/summary/{table}.parquet"), table=EVAL_TABLES),
        *([R("eval/summary/grow.parquet")] if GROWN_EXPERTS else []),
        R("ledger/flops.parquet"),
        R("ledger/paper_table3.parquet"),
        *expand(R("report/{figure}.png"), figure=FIGURES),
        R("report/results.html"),
        R("report/ledger.html"),
        R("report/harness.html"),
    ]
