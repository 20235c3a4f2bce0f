"""The 10-minute CPU speedrun, and the tokenizer table that picked our vocabulary, in bits per character.

    python -m logs.speedrun                           # both tables (about an hour on 2 cores)
    python -m logs.speedrun --section=tokenizers      # only the tokenizer table
    python -m logs.speedrun --section=speedrun --minutes=10
    python -m logs.speedrun --corpus=zh_large         # both tables on the larger corpus: logs/speedrun/zh_large/

tokenizers: the default recipe's model (config/train_zh_speedrun.py; on zh_large
config/train_zh_large_speedrun.py where it exists) trained for the same wall-clock budget on the
corpus (prepare.py --corpus) tokenised five ways: GPT-2's BPE and byte-level BPEs of
4,096, 8,192, 12,288 and 16,384 tokens trained on the train split. A smaller vocabulary makes each step
cheaper and each token carry less text; bits per character after the same time says which wins.

speedrun: (a) the nanoGPT way: GPT-2's BPE, the older project's tiny model (2 layers, 2 heads,
128 wide, block 64, batch 12, dropout 0.1), AdamW, float32, full logits and F.cross_entropy, at the
two best learning rates of a short sweep (so it is not a straw man); (b) our default recipe on its
config's data folder, at the best rate of its sweep and at its config's. Each side is scored by its
better run. Where the recipe's tokenizer is not prepare.py's default, (b) also trains the whole budget
on the default's folder: the check that the vocabulary chosen for this budget wins at it. All
train for `minutes` of wall-clock time (train.py --max_minutes: warm-up and cosine decay fitted to
the budget; its evaluations, a batch each, included), one after the other on this machine, and are
scored after the budget by val bits per character over the whole val split (score_val). Under each table, a second one gives each run's val bits per
character per source of the corpus (meta.json's spans; a folder prepared without them is prepared again).

Every run is an ordinary train.py run under `out`/runs; a finished run (its metrics.jsonl holds the
budget's end) is reused while its configuration is the one asked for today, its budget's schedule
follows the clock (its end records decay_finished) and it ran on this machine's CPU; any other is
started again. Each table is printed and written, whole or not at all, to its own report:
`out`/tokenizers.md and `out`/speedrun.md, each ending with the command that reproduces it.
"""
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run by path (python logs/X.py) as well as python -m logs.X
from opengpt import checkpoint as ckpt
from opengpt import folder_lock, hardware
from opengpt.cli import UserError, run
from opengpt.files import write_text
from configurator import parse_args
from opengpt.corpus import DEFAULT_CORPUS_NAME, EMBEDDED_CORPORA
from opengpt.data import data_folder, padded_vocab_size
from opengpt.data_layout import DEFAULT_VOCAB_SIZE, default_out, read_meta
from model import GPT, GPTConfig
from opengpt.run_log import read_events
from opengpt.run_setup import model_args_from
import eval as eval_script
import train

DEFAULTS = dict(
    section="all",  # all | tokenizers | speedrun
    corpus=DEFAULT_CORPUS_NAME,  # the embedded corpus the runs train on (prepare.py --corpus): zh_default | zh_large
    out="",  # reports and runs; empty: logs/speedrun, or logs/speedrun/<corpus> for another corpus
    minutes=10.0,  # the speedrun's budget per run
    sweep_minutes=2.0,  # per run of the learning-rate sweeps and of the tokenizer table
    nanogpt_lrs=(1e-3, 2e-3, 4e-3),  # (a)'s sweep; (b)'s is its config's rate x (1/2, 1, 2); each extended past a winning edge
)
RECIPE = os.path.join(REPO, "config", "train_zh_speedrun.py")
RECIPES = {"zh_large": os.path.join(REPO, "config", "train_zh_large_speedrun.py")}  # a corpus's own recipe, where it has one
TINY = os.path.join(REPO, "config", "train_tiny_zh_cpu.py")  # the older project's tiny model, on a CPU
TOKENIZER_FLAGS = {  # name: prepare.py's flags for it
    "GPT-2 BPE": dict(tokenizer="gpt2"),
    "BPE 4,096": dict(vocab_size=4096),
    "BPE 8,192": dict(vocab_size=8192),
    "BPE 12,288": dict(vocab_size=12288),
    "BPE 16,384": dict(vocab_size=16384),
}
DEFAULT_TOKENIZER = "BPE 8,192"  # what python prepare.py trains (prepare.DEFAULT_VOCAB_SIZE)
CORPUS_TEXT = {DEFAULT_CORPUS_NAME: "the default corpus (zh_default: People's Daily 1998-01 and 三国演义)",
               "zh_large": "the larger corpus (zh_large: zh_default, classical verse and prose, dictionary prose)"}
# (a): the older project's tiny model (config/train_tiny_zh_cpu.py: 2 layers, 2 heads, 128 wide, block
# 64, batch 12, dropout 0.1, AdamW) as nanoGPT trains it: GPT-2 tokens, float32, full logits.
NANOGPT_ARGS = ["--dtype=float32", "--compile=False", "--chunked_head_loss=False", "--optimizer=adamw"]
# Short names of the speedrun table's rows, for the columns of its per-source table
SHORT_LABELS = {"(a) the nanoGPT way": "(a)", "(a) at its second-best sweep lr": "(a) 2nd lr",
                "(b) our default recipe": "(b)", "(b) at its config's lr": "(b) config lr"}


def tokenizers(corpus):
    """name: (prepare.py flags, data folder) of each tokenizer of the table on an embedded corpus."""
    corpus_flags = [] if corpus == DEFAULT_CORPUS_NAME else [f"--corpus={corpus}"]
    rows = {}
    for name, flags in TOKENIZER_FLAGS.items():
        folder = default_out(corpus, dict(tokenizer="bpe", vocab_size=DEFAULT_VOCAB_SIZE) | flags)
        rows[name] = ([*corpus_flags, *(f"--{key}={value}" for key, value in flags.items())], folder)
    return rows


TOKENIZERS = tokenizers(DEFAULT_CORPUS_NAME)


def recipe_file(corpus):
    """The recipe's config: the corpus's own where it exists, else the default corpus's."""
    own = RECIPES.get(corpus)
    return own if own and os.path.isfile(own) else RECIPE


def out_folder(cfg):
    """Where a table's reports and runs go, relative to the repository."""
    return cfg["out"] or ("logs/speedrun" if cfg["corpus"] == DEFAULT_CORPUS_NAME else os.path.join("logs/speedrun", cfg["corpus"]))


class RunFailed(UserError):
    """A train.py run that exited with an error; the message ends with its last log line."""


def ensure_data(flags, folder):
    """The data folder, prepared first where it is missing or older than the per-source tables: its
    meta.json has no per-source spans, or a split from before each source had a share of val."""
    if not prepared_with_sources(os.path.join(REPO, folder)):
        subprocess.run([sys.executable, os.path.join(REPO, "prepare.py"), *flags], cwd=REPO, check=True)
    return folder


def prepared_with_sources(folder):
    meta = read_meta(folder) or {}
    return "min_val_chars_per_source" in meta and all("sources" in meta["splits"][split] for split in ("train", "val"))


def budget_run(cfg, name, config_file, args, minutes):
    """Train (or reuse) one run of `minutes`; returns its summary dict."""
    out_dir = os.path.join(REPO, out_folder(cfg), "runs", name)
    # In the budget, the first and last evaluations are a batch each; the whole val split is scored after
    # it (score_val). Scoring it in the budget would charge a run for its evaluation, not its training: on
    # zh_large's val (450K GPT-2 tokens) nanoGPT's full 50,257-token logits take most of a 2-minute budget.
    command = [sys.executable, os.path.join(REPO, "train.py"), config_file, *args, f"--max_minutes={minutes}",
               f"--out_dir={out_dir}", "--device=cpu", "--eval_interval=100000", "--val_full_split=False", "--eval_iters=1"]
    if not finished_as_asked(out_dir, command[2:]) or not os.path.isfile(os.path.join(out_dir, SCORE_FILE)):
        folder_lock.check_not_busy(out_dir, "train.py", inside=True)  # a run someone started there by hand
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        print(f"{name}: {minutes:g} min ...", flush=True)
        with open(os.path.join(out_dir, "train.log"), "w", encoding="utf-8") as log:
            result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            with open(os.path.join(out_dir, "train.log"), encoding="utf-8") as log:
                last_line = log.read().strip().splitlines()[-1]
            raise RunFailed(f"run {name} failed (exit {result.returncode}): {last_line}")
        score_val(out_dir)
        os.remove(os.path.join(out_dir, "ckpt.pt"))  # the log and the score are what the tables need
    return summary(out_dir)


SCORE_FILE = "val_score.json"


def score_val(out_dir):
    """Write out_dir/val_score.json: the run's checkpoint scored on the whole val split of the folder it
    trained on, overall and per source (eval.py's evaluation), in the dtype the run trained in."""
    path = os.path.join(out_dir, "ckpt.pt")
    checkpoint, model, tokenizer = ckpt.load_trained(path)
    config = checkpoint["config"]
    dtype = hardware.pick_dtype(config["dtype"], "cpu")
    started = time.time()
    _, val = eval_script.evaluate_val(checkpoint, model, tokenizer, data_folder(config), 32, 0, "cpu",
                                      hardware.autocast_context("cpu", dtype))
    score = dict(val_bpc=val["bpc"], val_loss=val["loss"], tokens=val["tokens"], dtype=dtype,
                 seconds=round(time.time() - started, 1), sources={name: s["bpc"] for name, s in val.get("sources", {}).items()})
    write_text(os.path.join(out_dir, SCORE_FILE), json.dumps(score, indent=1) + "\n")


def finished_as_asked(out_dir, train_args):
    """Whether out_dir holds a finished run whose configuration is the one train_args give today.
    Runs are reused by name, so without this check an edited config file or train.py default would
    leave a table built from runs of the old recipe. Paths are compared relative to the repository
    each run was made in, so a committed run stays reusable in another clone. A flag train.py gained
    after the run, left at its default, asks for what the run did: new flags default to the old way.
    Not reused either: a run whose schedule did not follow the clock (its time_budget_end has no
    decay_finished: --max_minutes fixed its horizon once), or one made on another CPU, whose steps,
    and so whose bits per character after the same minutes, are not this machine's."""
    events = read_events(out_dir)
    end = next((e for e in events if e["event"] == "time_budget_end"), None)
    if end is None or "decay_finished" not in end:
        return False
    recorded = next(e for e in events if e["event"] == "config")
    if recorded.get("machine") != hardware.device_name("cpu"):  # the runs are --device=cpu
        return False
    made_in = os.path.dirname(recorded["argv"][0]) or REPO  # the repository holding the train.py that ran
    today = parse_args(train.DEFAULTS, train_args)
    today = {key: value for key, value in today.items() if key in recorded["config"] or value != train.DEFAULTS[key]}
    return repository_relative(recorded["config"], made_in) == repository_relative(today, REPO)


def repository_relative(config, repository):
    prefix = repository + os.sep
    return {key: value.replace(prefix, "") if isinstance(value, str) else value for key, value in config.items()}


def summary(out_dir):
    events = read_events(out_dir)
    config = next(e for e in events if e["event"] == "config")["config"]
    final = [e for e in events if e["event"] == "eval"][-1]
    steps = [e for e in events if e["event"] == "train"]
    end = next(e for e in events if e["event"] == "time_budget_end")
    with open(os.path.join(out_dir, SCORE_FILE), encoding="utf-8") as f:
        score = json.load(f)  # the whole val split, scored after the budget (score_val)
    with open(os.path.join(config["data_dir"], "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    train_split = meta["splits"]["train"]
    # as the run counted them (opengpt.training.Training.tokens_per_step: all processes' micro-batches)
    tokens_per_step = round(steps[-1]["tokens_per_sec"] * steps[-1]["time_ms"] / 1000)
    # a run recorded before a model flag existed trained with that flag's default
    model = GPT(GPTConfig(**model_args_from(train.DEFAULTS | config, padded_vocab_size(meta["vocab_size"]))))
    return dict(
        config=config, meta=meta, steps=final["iter"], dtype=hardware.pick_dtype(config["dtype"], config["device"]), tokens=final["iter"] * tokens_per_step,
        characters=final["iter"] * tokens_per_step * (train_split["characters"] + train_split["documents"]) / train_split["tokens"],
        val_bpc=score["val_bpc"], val_loss=score["val_loss"], seconds=end["elapsed_seconds"],
        ms_per_step=statistics.median(e["time_ms"] for e in steps), parameters=model.get_num_params(),
        machine=next(e for e in events if e["event"] == "config")["machine"],
        planned=end["decay_finished"],  # finished_as_asked reuses no run from before the schedule recorded it
        val_sources=score["sources"],
        replans=sum(e["event"] == "time_budget_replan" for e in events),  # the machine's speed changed: the horizon followed
    )


def recipe_run(cfg, folder, lr, minutes):
    """Our recipe on a data folder: the tokenizer table's run on the recipe's folder is also one of (b)'s sweep."""
    name = f"recipe_{os.path.basename(folder)}_lr{lr:g}_{minutes:g}min"
    return budget_run(cfg, name, recipe_file(cfg["corpus"]), [f"--data_dir={os.path.join(REPO, folder)}", *lr_args(lr)], minutes)


def recipe_learning_rate(corpus=DEFAULT_CORPUS_NAME):
    return parse_args(train.DEFAULTS, [recipe_file(corpus)])["learning_rate"]


def recipe_tokenizer(corpus=DEFAULT_CORPUS_NAME):
    """The tokenizer row whose data folder the recipe's config trains on: on a corpus whose recipe is
    the default corpus's, the same tokenizer on this corpus (recipe_run gives its folder as --data_dir)."""
    recipe = recipe_file(corpus)
    folder = data_folder(parse_args(train.DEFAULTS, [recipe]))
    for rows in (tokenizers(corpus), TOKENIZERS):
        for name, (_, row_folder) in rows.items():
            if row_folder == folder:
                return name
    raise UserError(f"{recipe} trains on {folder}, which is not a tokenizer of this table; add it to TOKENIZER_FLAGS")


def best_learning_rate(lrs, run_at):
    """(best lr, {lr: run}) over a grid that grows past a winning edge, at most twice."""
    lrs, sweep = sorted(lrs), {}
    for _ in range(3):
        for lr in lrs:
            if lr not in sweep:
                sweep[lr] = run_at(lr)
        best = min(sweep, key=lambda lr: sweep[lr]["val_bpc"])
        if best == lrs[0]:
            lrs.insert(0, lrs[0] / 2)
        elif best == lrs[-1]:
            lrs.append(lrs[-1] * 2)
        else:
            break
    return best, sweep


def tokenizer_table(cfg):
    corpus, rows = cfg["corpus"], {}
    for name, (flags, folder) in tokenizers(corpus).items():
        ensure_data(flags, folder)
        try:
            rows[name] = recipe_run(cfg, folder, recipe_learning_rate(corpus), cfg["sweep_minutes"])
        except RunFailed as e:  # e.g. a vocabulary whose head is too slow for the budget: a row that says so
            rows[name] = str(e).split(": train.py: error: ")[-1]
    finished = [name for name, row in rows.items() if isinstance(row, dict)]
    if not finished:
        first, failure = next(iter(rows.items()))
        raise UserError(f"no run of the tokenizer table finished; {first}: {failure}")
    best = min(finished, key=lambda name: rows[name]["val_bpc"])
    recipe = rows[best]["config"]
    lines = [
        f"Our recipe's model ({recipe['n_layer']} layers, {recipe['n_embd']} wide, block {recipe['block_size']}, "
        f"batch {recipe['batch_size']}, {rows[best]['dtype']}, {recipe['optimizer']}, lr {recipe['learning_rate']:g}) trained for "
        f"{cfg['sweep_minutes']:g} minutes of wall-clock time on {CORPUS_TEXT.get(corpus, corpus)} under each tokenizer "
        f"(`--max_minutes`: warm-up and cosine decay fitted to the budget); val bits per character over the whole val split, "
        f"scored after the budget.",
        "",
        "| tokenizer | vocabulary | val characters / token | ms / step | steps | characters seen | val bits / char |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if isinstance(row, str):
            lines.append(f"| {name} | | | | | | did not fit: {row} |")
            continue
        val = row["meta"]["splits"]["val"]
        bold = "**" if name == best else ""
        lines.append(f"| {name} | {row['meta']['vocab_size']:,} | {val['characters'] / val['tokens']:.2f} | "
                     f"{row['ms_per_step']:.0f} | {row['steps']:,} | {row['characters'] / 1e6:.2f}M | "
                     f"{bold}{row['val_bpc']:.3f}{bold} |")
    lines += ["", f"Best: {best}. The recipe's config ({os.path.relpath(recipe_file(corpus), REPO)}) trains on "
                  f"{recipe_tokenizer(corpus)} (its `dataset`)."]
    lines += source_table([(name, name, row) for name, row in rows.items() if isinstance(row, dict)], corpus)
    lines += ["", f"{machine_line(rows[best])} Command: `{command(cfg, 'tokenizers')}`."]
    return "\n".join(lines) + "\n"


def speedrun_table(cfg):
    corpus = cfg["corpus"]
    corpus_tokenizers = tokenizers(corpus)
    gpt2_folder = ensure_data(*corpus_tokenizers["GPT-2 BPE"])
    ours_on = recipe_tokenizer(corpus)
    folder = ensure_data(*corpus_tokenizers[ours_on])

    def nanogpt_run(lr, minutes):
        data_dir = f"--data_dir={os.path.join(REPO, gpt2_folder)}"
        return budget_run(cfg, f"nanogpt_lr{lr:g}_{minutes:g}min", TINY, [*NANOGPT_ARGS, data_dir, *lr_args(lr)], minutes)

    best_lr, sweep = best_learning_rate(cfg["nanogpt_lrs"], lambda lr: nanogpt_run(lr, cfg["sweep_minutes"]))
    recipe_lr = recipe_learning_rate(corpus)
    our_lr, our_sweep = best_learning_rate((recipe_lr / 2, recipe_lr, recipe_lr * 2),
                                           lambda lr: recipe_run(cfg, folder, lr, cfg["sweep_minutes"]))
    # A short sweep is a rough guide to the rate for the whole budget (from one run of this table to the
    # next it has picked either of two neighbouring rates), so each side trains the whole budget at two
    # rates and is scored by the better run: (a) at the two best of its sweep; (b) at the best of its
    # sweep and at its config's, which longer runs side by side picked (logs/README.md#tuning-the-cpu-recipe).
    second_lr = sorted(sweep, key=lambda lr: sweep[lr]["val_bpc"])[1]
    nanogpt_rows = [("(a) the nanoGPT way", nanogpt_run(best_lr, cfg["minutes"])),
                    ("(a) at its second-best sweep lr", nanogpt_run(second_lr, cfg["minutes"]))]
    recipe_rows = [("(b) our default recipe", recipe_run(cfg, folder, our_lr, cfg["minutes"]))]
    if our_lr != recipe_lr:
        recipe_rows.append(("(b) at its config's lr", recipe_run(cfg, folder, recipe_lr, cfg["minutes"])))
    nanogpt = min((row for _, row in nanogpt_rows), key=lambda row: row["val_bpc"])
    ours = min((row for _, row in recipe_rows), key=lambda row: row["val_bpc"])
    # Not scored: the recipe as (b) ran it, on prepare.py's default tokenizer instead of its own
    vocabulary_check = []
    if ours_on != DEFAULT_TOKENIZER:
        default_folder = ensure_data(*corpus_tokenizers[DEFAULT_TOKENIZER])
        on_default = recipe_run(cfg, default_folder, ours["config"]["learning_rate"], cfg["minutes"])
        vocabulary_check = [(f"(b) on {DEFAULT_TOKENIZER}, not scored", on_default)]
    rows = nanogpt_rows + recipe_rows + vocabulary_check
    check_text = (f"(b) on {DEFAULT_TOKENIZER} (`python prepare.py`'s default) is the same recipe and lr on that tokenizer: "
                  f"the check of the recipe's vocabulary at this budget, not scored. " if vocabulary_check else "")
    lines = [
        f"{cfg['minutes']:g} minutes of training each (`--max_minutes={cfg['minutes']:g}`) on {CORPUS_TEXT.get(corpus, corpus)}, "
        f"one after the other, val bits per character over the whole val split, "
        f"scored after the budget (lower is better; in the budget each evaluation is a batch).",
        "",
        "| run | tokenizer | parameters | dtype | optimizer | lr | steps | tokens seen | characters seen | val bits / char | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in rows:
        c = row["config"]
        tokenizer = "GPT-2 BPE" if row["meta"]["tokenizer"]["kind"] == "gpt2" else f"BPE {row['meta']['vocab_size']:,}"
        lines.append(f"| {label} | {tokenizer} | {row['parameters'] / 1e6:.2f}M | {row['dtype']} | {c['optimizer']} | {c['learning_rate']:g} | "
                     f"{row['steps']:,} | {row['tokens'] / 1e6:.2f}M | {row['characters'] / 1e6:.2f}M | "
                     f"{row['val_bpc']:.3f} | {row['seconds']:.0f} |")
    unplanned = [label for label, row in rows if not row["planned"]]
    lines += [
        "",
        f"(b) / (a) = **{ours['val_bpc'] / nanogpt['val_bpc']:.3f}x** the bits per character, the better "
        f"{cfg['minutes']:g}-minute run of each side ({ours['val_bpc']:.3f} / {nanogpt['val_bpc']:.3f}). "
        f"Sweeps of {cfg['sweep_minutes']:g}-minute runs (lr: val bits/char): (a) {sweep_text(sweep)}; "
        f"(b) {sweep_text(our_sweep)}. (a) trains the whole budget at the two best rates of its sweep; (b) at the best of "
        f"its sweep and at its config's ({recipe_lr:g}, picked by longer runs side by side: logs/README.md#tuning-the-cpu-recipe). "
        f"{check_text}(a) is nanoGPT's model and loss "
        f"(full logits, `--chunked_head_loss=False`) run by our train.py, so both share the data pipeline and evaluation.",
    ]
    if unplanned:
        lines.append(f"{' and '.join(unplanned)} stopped at the time guard, before the planned horizon, its decay unfinished: "
                     f"the machine stalled near the end of the budget.")
    else:
        lines.append("Every run's cosine decay finished: its last evaluation was at min_lr.")
    replanned = [f"{label} {row['replans']}" for label, row in rows if row.get("replans")]
    if replanned:
        lines.append(f"Re-plans of the horizon as the machine's speed changed (`--max_minutes` follows the clock): "
                     f"{', '.join(replanned)}.")
    lines += source_table([(label, SHORT_LABELS.get(label, f"(b) {DEFAULT_TOKENIZER}"), row) for label, row in rows], corpus)
    lines += ["", f"{machine_line(ours)} Command: `{command(cfg, 'speedrun')}`."]
    return "\n".join(lines) + "\n"


def source_table(runs, corpus):
    """The lines of a table of val bits per character per source of the corpus, a column per run:
    runs are (label, short label, summary). Sources in corpus order, each with its val characters."""
    characters = {}
    for span in runs[0][2]["meta"]["splits"]["val"].get("sources", []):
        characters[span["source"]] = characters.get(span["source"], 0) + span["characters"]
    if not characters:
        return []
    least = runs[0][2]["meta"].get("min_val_chars_per_source")
    shares = f"; each source's val holds at least {least:,} characters or a tenth of the source" if least else ""
    lines = ["", f"Val bits per character by source of {corpus} (with its val characters{shares}), the same runs"
                 + "".join(f"; {short} = {label}" for label, short, _ in runs if short != label) + ".",
             "", "| source | val characters | " + " | ".join(short for _, short, _ in runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    for source, count in characters.items():
        bits = [run["val_sources"].get(source) for _, _, run in runs]
        lines.append(f"| {source} | {count:,} | " + " | ".join("" if b is None else f"{b:.3f}" for b in bits) + " |")
    return lines


def command(cfg, section):
    """The command that makes a table again: its section and the options not at their defaults."""
    given = [shlex.quote(f"--{key}={value}") for key, value in cfg.items()
             if key in ("corpus", "minutes", "sweep_minutes", "nanogpt_lrs") and value != DEFAULTS[key]]
    return " ".join(["python -m logs.speedrun", f"--section={section}", *given])


def sweep_text(sweep):
    return ", ".join(f"{lr:g}: {run['val_bpc']:.3f}" for lr, run in sorted(sweep.items()))


def lr_args(lr):
    return [f"--learning_rate={lr}", f"--min_lr={lr / 10}"]


def machine_line(row):
    flags = hardware.cpu_flags()
    features = "AMX-BF16" if "amx_bf16" in flags else "AVX-512 + AVX512_BF16, no AMX" if "avx512_bf16" in flags else \
        "AVX-512, no AMX" if "avx512f" in flags else "AVX2, no AVX-512 or AMX"
    load = os.getloadavg()[0]
    return (f"CPU: {row['machine']}, {os.cpu_count()} cores, {features}; torch {torch_version()}, "
            f"Python {platform.python_version()}; load average {load:.1f} when the table was written.")


def torch_version():
    import torch

    return torch.__version__


def main():
    cfg = parse_args(DEFAULTS, sys.argv[1:])
    sections = {"tokenizers": tokenizer_table, "speedrun": speedrun_table}
    if cfg["section"] not in (*sections, "all"):
        raise UserError(f"unknown --section={cfg['section']}; choose all, tokenizers or speedrun")
    if cfg["corpus"] not in EMBEDDED_CORPORA:
        raise UserError(f"--corpus={cfg['corpus']} is not an embedded corpus; choose one of {', '.join(EMBEDDED_CORPORA)}")
    for key in ("minutes", "sweep_minutes"):
        if cfg[key] <= 0:
            raise UserError(f"--{key}={cfg[key]:g} must be above 0: each run trains for that many minutes")
    out = os.path.join(REPO, out_folder(cfg))
    try:
        os.makedirs(out, exist_ok=True)
        # one table maker per folder: a second would remove the first one's live runs to start them again
        lock = folder_lock.FolderLock(out, "python -m logs.speedrun", inside=True)
    except OSError as e:
        raise UserError(f"cannot write in --out={out}: {e.strerror or e}") from None
    try:
        for name, make_table in sections.items():
            if cfg["section"] not in (name, "all"):
                continue
            started = time.time()
            table = make_table(cfg)
            path = os.path.join(out, f"{name}.md")
            write_text(path, table)
            print(table)
            print(f"{name}: {(time.time() - started) / 60:.1f} min; wrote {path}")
    finally:
        lock.release()


if __name__ == "__main__":
    run(main)
