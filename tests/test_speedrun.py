"""logs/speedrun.py: the nanoGPT way gets its best learning rate (the sweep grows past a winning
edge), and the tables report what the runs measured. Training is replaced by a fake here; the
runs themselves are ordinary train.py runs, tested in test_time_budget.py and test_train.py."""
import os
import sys

import pytest

from conftest import REPO, read_events
from test_eval import two_source_run  # noqa: F401 (a fixture: a tiny run of two sources, val read whole)

from logs import speedrun


VAL_SOURCES = [dict(source="news", characters=600), dict(source="poetry", characters=300), dict(source="news", characters=100)]


def fake_run(val_bpc, steps=100, lr=1e-3, vocab=8192, kind="bpe"):
    """A run's summary: val_bpc overall, val_bpc - 1 on the news and val_bpc + 1 on the poetry."""
    config = dict(n_layer=2, n_embd=128, block_size=64, batch_size=12, dtype="float32", optimizer="adamw", learning_rate=lr)
    meta = dict(vocab_size=vocab, tokenizer=dict(kind=kind), min_val_chars_per_source=4000,
                splits=dict(val=dict(characters=1000, tokens=700, sources=VAL_SOURCES)))
    return dict(config=config, meta=meta, steps=steps, dtype="float32", tokens=steps * 768, characters=steps * 1000.0, val_bpc=val_bpc,
                seconds=600.0, ms_per_step=50.0, parameters=1.5e6, machine="a test CPU", planned=True,
                val_sources=dict(news=val_bpc - 1, poetry=val_bpc + 1))


def parabola_training(calls, recipe_best):
    """A budget_run stand-in: bits/char are a parabola in log2(lr), lowest at 8e-3 for the nanoGPT
    runs and at recipe_best for the recipe's."""
    import math

    def budget_run(cfg, name, config_file, args, minutes):
        calls.append((name, minutes))
        lr = next(float(a.split("=")[1]) for a in args if a.startswith("--learning_rate="))
        best = 8e-3 if name.startswith("nanogpt") else recipe_best
        bpc = (8.0 if name.startswith("nanogpt") else 5.0) + (math.log2(lr / best)) ** 2 / 10
        return fake_run(bpc, lr=lr, kind="gpt2" if name.startswith("nanogpt") else "bpe")

    return budget_run


@pytest.fixture
def fake_training(monkeypatch):
    """budget_run replaced: the recipe's sweep is lowest at 3e-3, its config's rate."""
    calls = []
    monkeypatch.setattr(speedrun, "budget_run", parabola_training(calls, 3e-3))
    monkeypatch.setattr(speedrun, "ensure_data", lambda flags, folder: folder)
    return calls


def recipe_run_name(lr, minutes, corpus="zh_default"):
    """The name of the recipe's run on its config's data folder."""
    folder = speedrun.tokenizers(corpus)[speedrun.recipe_tokenizer(corpus)][1]
    return f"recipe_{os.path.basename(folder)}_lr{lr:g}_{minutes:g}min"


def test_the_sweep_grows_past_a_winning_edge_then_trains_the_winner(fake_training):
    cfg = dict(speedrun.DEFAULTS)
    table = speedrun.speedrun_table(cfg)
    sweep = [name for name, minutes in fake_training if name.startswith("nanogpt") and minutes == cfg["sweep_minutes"]]
    assert sweep == [f"nanogpt_lr{lr}_2min" for lr in ("0.001", "0.002", "0.004", "0.008", "0.016")]
    assert ("nanogpt_lr0.008_10min", cfg["minutes"]) in fake_training
    assert ("nanogpt_lr0.004_10min", cfg["minutes"]) in fake_training  # the runner-up (tied with 0.016: the lower)
    recipe_lr = speedrun.recipe_learning_rate()  # (b)'s sweep is centred on its config's rate
    assert (recipe_run_name(3e-3, 10), cfg["minutes"]) in fake_training
    assert sum(name.startswith("recipe") and minutes == cfg["sweep_minutes"] for name, minutes in fake_training) >= 3
    assert recipe_run_name(recipe_lr, 2) in [name for name, _ in fake_training]
    assert "(b) / (a) = **0.625x**" in table  # 5.0 / 8.0
    assert "| (a) the nanoGPT way | GPT-2 BPE |" in table and "| (b) our default recipe | BPE 8,192 |" in table


def test_each_table_is_written_whole_to_its_own_report_ending_with_its_command(fake_training, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["speedrun.py", f"--out={tmp_path}"])
    speedrun.main()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speedrun.md", "tokenizers.md"]  # no temp file left
    for name in ("tokenizers", "speedrun"):
        report = (tmp_path / f"{name}.md").read_text(encoding="utf-8")
        assert report.startswith(("Our recipe's model", "10 minutes of training each"))
        assert "the default corpus (zh_default" in report.split("\n")[0]
        assert report.endswith(f"Command: `python -m logs.speedrun --section={name}`.\n")


def test_the_larger_corpus_has_its_own_folders_reports_and_command(monkeypatch, tmp_path):
    """--corpus=zh_large: prepare.py's folders of that corpus, runs and reports under
    logs/speedrun/zh_large, tables that name the corpus and end with the command that makes them."""
    calls, data = [], []
    fake = parabola_training(calls, 3e-3)

    def budget_run(cfg, name, config_file, args, minutes):
        data.append((name, config_file, next(a for a in args if a.startswith("--data_dir="))))
        return fake(cfg, name, config_file, args, minutes)

    written = []
    monkeypatch.setattr(speedrun, "budget_run", budget_run)
    monkeypatch.setattr(speedrun, "ensure_data", lambda flags, folder: written.append((flags, folder)) or folder)
    monkeypatch.setattr(speedrun, "REPO", str(tmp_path))  # the reports land in tmp_path/logs/speedrun/zh_large
    monkeypatch.setattr(sys, "argv", ["speedrun.py", "--corpus=zh_large"])
    speedrun.main()
    reports = tmp_path / "logs" / "speedrun" / "zh_large"
    assert sorted(p.name for p in reports.iterdir()) == ["speedrun.md", "tokenizers.md"]
    assert dict((folder, flags) for flags, folder in written) == {
        "data/zh_large_gpt2": ["--corpus=zh_large", "--tokenizer=gpt2"], "data/zh_large_bpe4096": ["--corpus=zh_large", "--vocab_size=4096"],
        "data/zh_large": ["--corpus=zh_large", "--vocab_size=8192"], "data/zh_large_bpe12288": ["--corpus=zh_large", "--vocab_size=12288"],
        "data/zh_large_bpe16384": ["--corpus=zh_large", "--vocab_size=16384"]}
    import prepare
    from configurator import parse_args
    for flags, folder in written:  # prepare.py's own folder for those flags
        assert prepare.default_out("zh_large", parse_args(dict(prepare.DEFAULTS), flags)) == folder
    recipe = speedrun.recipe_file("zh_large")
    assert all(config_file == recipe for name, config_file, _ in data if name.startswith("recipe"))
    assert {data_dir for name, _, data_dir in data if name.startswith("nanogpt")} == {f"--data_dir={tmp_path}/data/zh_large_gpt2"}
    assert all("zh_large" in data_dir for _, _, data_dir in data)
    for name in ("tokenizers", "speedrun"):
        report = (reports / f"{name}.md").read_text(encoding="utf-8")
        assert "the larger corpus (zh_large" in report.split("\n")[0] and "default corpus" not in report
        assert report.endswith(f"Command: `python -m logs.speedrun --section={name} --corpus=zh_large`.\n")


def test_the_larger_corpus_takes_its_own_recipe_where_it_has_one(monkeypatch, tmp_path):
    """config/train_zh_large_speedrun.py when it exists, else the default corpus's recipe, whose
    tokenizer is then taken on the larger corpus."""
    monkeypatch.setitem(speedrun.RECIPES, "zh_large", str(tmp_path / "absent.py"))
    assert speedrun.recipe_file("zh_large") == speedrun.RECIPE
    assert speedrun.recipe_tokenizer("zh_large") == speedrun.recipe_tokenizer()
    own = tmp_path / "train_zh_large_speedrun.py"
    own.write_text(f"exec(open({speedrun.RECIPE!r}).read())\ndataset = 'zh_large_bpe4096'\nlearning_rate = 0.01\n", encoding="utf-8")
    monkeypatch.setitem(speedrun.RECIPES, "zh_large", str(own))
    assert speedrun.recipe_file("zh_large") == str(own) and speedrun.recipe_tokenizer("zh_large") == "BPE 4,096"
    assert speedrun.recipe_learning_rate("zh_large") == 0.01


def test_the_tokenizer_table_marks_the_lowest_bits_per_character(monkeypatch):
    results = iter([None, 5.9, 5.6, 5.8, 5.7])

    def budget_run(cfg, name, config_file, args, minutes):
        bpc = next(results)
        if bpc is None:  # GPT-2's vocabulary: the head too slow for the budget
            raise speedrun.RunFailed(f"run {name} failed (exit 2): train.py: error: --max_minutes=2 leaves room for 12 steps")
        return fake_run(bpc)

    monkeypatch.setattr(speedrun, "budget_run", budget_run)
    monkeypatch.setattr(speedrun, "ensure_data", lambda flags, folder: folder)
    table = speedrun.tokenizer_table(dict(speedrun.DEFAULTS))
    assert "**5.600**" in table and table.count("**") == 2 and "Best: BPE 8,192." in table
    assert "| GPT-2 BPE | | | | | | did not fit: --max_minutes=2 leaves room for 12 steps |" in table


def write_finished_run(out_dir, train_args, made_in=REPO, machine=None, end=None):
    """A run folder as train.py leaves it after `train.py train_args`, as if made in the clone `made_in`,
    on `machine` (default: this one), its time_budget_end `end` (default: today's, decay finished)."""
    import json

    import train
    from configurator import parse_args
    from opengpt import hardware

    def moved(value):
        return value.replace(REPO, made_in) if isinstance(value, str) else value

    config = {key: moved(value) for key, value in parse_args(dict(train.DEFAULTS), train_args).items()}
    os.makedirs(out_dir)
    with open(os.path.join(out_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
        argv = [moved(a) for a in [os.path.join(REPO, "train.py"), *train_args]]
        f.write(json.dumps(dict(event="config", config=config, argv=argv, machine=machine or hardware.device_name("cpu"))) + "\n")
        f.write(json.dumps(end or dict(event="time_budget_end", elapsed_seconds=60.0, budget_seconds=60.0, decay_finished=True)) + "\n")


def test_a_finished_run_is_reused_only_while_its_configuration_is_unchanged(tmp_path):
    recipe = os.path.join(REPO, "config", "train_zh_speedrun.py")
    args = [recipe, "--learning_rate=0.003", f"--data_dir={os.path.join(REPO, 'data', 'zh_default')}", "--max_minutes=2"]
    write_finished_run(str(tmp_path / "here"), args)
    assert speedrun.finished_as_asked(str(tmp_path / "here"), args)
    assert not speedrun.finished_as_asked(str(tmp_path / "here"), [*args, "--dropout=0.1"])  # e.g. an edited config file
    assert not speedrun.finished_as_asked(str(tmp_path / "here"), [*args[:-1], "--max_minutes=10"])

    # the same run committed from another clone: its paths name that clone's folder
    write_finished_run(str(tmp_path / "moved"), args, made_in=str(tmp_path / "clone"))
    assert speedrun.finished_as_asked(str(tmp_path / "moved"), args)


def test_a_run_from_before_a_new_flag_is_reused_while_the_flag_is_at_its_default(tmp_path):
    import json
    args = [os.path.join(REPO, "config", "train_tiny_zh_cpu.py"), "--learning_rate=0.004", "--max_minutes=2"]
    write_finished_run(str(tmp_path / "older"), args)
    metrics = tmp_path / "older" / "metrics.jsonl"
    events = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    del events[0]["config"]["ema_decay"]  # as train.py recorded it before it had the flag
    metrics.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    assert speedrun.finished_as_asked(str(tmp_path / "older"), args)
    assert not speedrun.finished_as_asked(str(tmp_path / "older"), [*args, "--ema_decay=0.99"])


def test_an_unfinished_run_is_not_reused(tmp_path):
    assert not speedrun.finished_as_asked(str(tmp_path / "missing"), ["--learning_rate=0.003"])


def test_a_run_of_the_schedule_fixed_once_or_from_another_cpu_is_not_reused(tmp_path):
    """Its configuration is the one asked for, but its --max_minutes horizon was fixed from the warm-up
    (no decay_finished in its end: before the schedule followed the clock), or it ran on another CPU:
    it is trained again. The same run with today's schedule on this CPU is reused, its decay
    finished or not (a stalled machine is a result, not a reason to run again)."""
    args = [os.path.join(REPO, "config", "train_zh_speedrun.py"), "--learning_rate=0.003", "--max_minutes=2"]
    older = dict(event="time_budget_end", elapsed_seconds=60.0, budget_seconds=60.0)
    write_finished_run(str(tmp_path / "fixed_once"), args, end=older)
    write_finished_run(str(tmp_path / "elsewhere"), args, machine="Intel(R) Xeon(R) Platinum 8480+ (2 threads)")
    write_finished_run(str(tmp_path / "unfinished_decay"), args, end=older | dict(decay_finished=False))
    assert not speedrun.finished_as_asked(str(tmp_path / "fixed_once"), args)
    assert not speedrun.finished_as_asked(str(tmp_path / "elsewhere"), args)
    assert speedrun.finished_as_asked(str(tmp_path / "unfinished_decay"), args)


def test_each_table_gives_each_runs_bits_per_character_per_source(fake_training):
    """Under each table, a row per source in corpus order (a source's spans added up), a column per
    run of the table above: "(b) beats (a) on the news, not on the poetry" can be read off it."""
    table = speedrun.speedrun_table(dict(speedrun.DEFAULTS))
    per_source = table[table.index("Val bits per character by source"):]
    header = "| source | val characters | (a) | (a) 2nd lr | (b) |"
    assert header in per_source and "(a) = (a) the nanoGPT way" in per_source
    news, poetry = (line for line in per_source.splitlines() if line.startswith(("| news", "| poetry")))
    # (a)'s sweep is best at 8e-3 (8.0), its runner-up 4e-3 (8.1); (b) at its config's rate (5.0)
    assert news.startswith("| news | 700 | 7.000 | 7.100 | 4.000 |") and poetry.startswith("| poetry | 300 | 9.000 | 9.100 | 6.000 |")
    assert "at least 4,000 characters or a tenth of the source" in per_source
    tokenizers = speedrun.tokenizer_table(dict(speedrun.DEFAULTS))
    assert "| source | val characters | GPT-2 BPE | BPE 4,096 | BPE 8,192 | BPE 12,288 | BPE 16,384 |" in tokenizers


def test_a_data_folder_prepared_before_sources_is_prepared_again(tmp_path, monkeypatch):
    """A folder whose meta.json has no per-source spans, or a split from before sources had their
    shares of val, would give a table without per-source rows, or rows of a few characters."""
    import json
    commands = []
    monkeypatch.setattr(speedrun, "REPO", str(tmp_path))
    monkeypatch.setattr(speedrun.subprocess, "run", lambda command, **kwargs: commands.append(command[2:]))
    folder = tmp_path / "data" / "zh_large"
    folder.mkdir(parents=True)
    split = dict(documents=1, characters=1, bytes=1, tokens=1)
    for meta, prepared_again in [(None, True), (dict(splits=dict(train=split, val=split), min_val_chars_per_source=4000), True),
                                 (dict(splits=dict(train=split | dict(sources=[]), val=split | dict(sources=[]))), True),
                                 (dict(splits=dict(train=split | dict(sources=[]), val=split | dict(sources=[])), min_val_chars_per_source=4000), False)]:
        if meta is not None:
            (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        commands.clear()
        speedrun.ensure_data(["--corpus=zh_large", "--vocab_size=8192"], "data/zh_large")
        assert commands == ([["--corpus=zh_large", "--vocab_size=8192"]] if prepared_again else [])


def test_when_the_short_sweep_prefers_another_rate_b_also_runs_at_its_configs(monkeypatch):
    import math
    calls = []
    recipe_lr = speedrun.recipe_learning_rate()
    monkeypatch.setattr(speedrun, "budget_run", parabola_training(calls, 4 * recipe_lr))  # the short sweep: best at 4x
    monkeypatch.setattr(speedrun, "ensure_data", lambda flags, folder: folder)
    cfg = dict(speedrun.DEFAULTS)
    table = speedrun.speedrun_table(cfg)
    assert (recipe_run_name(4 * recipe_lr, 10), cfg["minutes"]) in calls
    assert (recipe_run_name(recipe_lr, 10), cfg["minutes"]) in calls
    assert f"| (b) at its config's lr | BPE 8,192 | 1.50M | float32 | adamw | {recipe_lr:g} |" in table
    at_config_bpc = 5.0 + math.log2(1 / 4) ** 2 / 10
    assert f"| {at_config_bpc:.3f} |" in table
    assert "(b) / (a) = **0.625x** the bits per character, the better 10-minute run of each side (5.000 / 8.000)" in table


def test_each_side_is_scored_by_its_better_run_of_the_whole_budget(monkeypatch):
    """Over 10 minutes (a)'s runner-up rate beats its sweep's winner, and (b)'s config rate beats its
    sweep's: the ratio takes each side's better run."""
    whole_budget = {"nanogpt_lr0.004_10min": 7.5, recipe_run_name(0.006, 10): 4.9}
    calls = []
    short = parabola_training(calls, 0.024)  # the short sweeps: (a) best at 0.008, then 0.004; (b) best at 0.024

    def budget_run(cfg, name, config_file, args, minutes):
        row = short(cfg, name, config_file, args, minutes)
        return row | {"val_bpc": whole_budget.get(name, row["val_bpc"])}

    monkeypatch.setattr(speedrun, "budget_run", budget_run)
    monkeypatch.setattr(speedrun, "ensure_data", lambda flags, folder: folder)
    monkeypatch.setattr(speedrun, "recipe_learning_rate", lambda corpus="zh_default": 0.006)
    table = speedrun.speedrun_table(dict(speedrun.DEFAULTS))
    assert "| (a) the nanoGPT way | GPT-2 BPE | 1.50M | float32 | adamw | 0.008 |" in table
    assert "| (a) at its second-best sweep lr | GPT-2 BPE | 1.50M | float32 | adamw | 0.004 |" in table
    assert "| (b) our default recipe | BPE 8,192 | 1.50M | float32 | adamw | 0.024 |" in table
    assert "| (b) at its config's lr | BPE 8,192 | 1.50M | float32 | adamw | 0.006 |" in table
    assert "(b) / (a) = **0.653x** the bits per character, the better 10-minute run of each side (4.900 / 7.500)" in table


def test_the_default_tokenizer_is_the_folder_plain_prepare_writes():
    import prepare

    flags, folder = speedrun.tokenizers("zh_default")[speedrun.DEFAULT_TOKENIZER]
    assert flags == [f"--vocab_size={prepare.DEFAULT_VOCAB_SIZE}"] and folder == prepare.default_out("zh_default", prepare.DEFAULTS)


@pytest.mark.parametrize("recipe_tokenizer", ["BPE 12,288", speedrun.DEFAULT_TOKENIZER])
def test_a_recipe_on_another_vocabulary_is_checked_on_the_default_one_unscored(monkeypatch, recipe_tokenizer):
    """The recipe's own tokenizer is scored; prepare.py's default gets one whole-budget run at the
    winning rate beside it, which does not count even when it is better."""
    calls = []
    short = parabola_training(calls, 3e-3)

    def budget_run(cfg, name, config_file, args, minutes):
        row = short(cfg, name, config_file, args, minutes)
        return row | {"val_bpc": 4.0} if name == "recipe_zh_default_lr0.003_10min" else row

    monkeypatch.setattr(speedrun, "budget_run", budget_run)
    monkeypatch.setattr(speedrun, "ensure_data", lambda flags, folder: folder)
    monkeypatch.setattr(speedrun, "recipe_learning_rate", lambda corpus="zh_default": 3e-3)
    monkeypatch.setattr(speedrun, "recipe_tokenizer", lambda corpus="zh_default": recipe_tokenizer)
    table = speedrun.speedrun_table(dict(speedrun.DEFAULTS))
    recipe_runs = [name for name, minutes in calls if name.startswith("recipe") and minutes == 10]
    if recipe_tokenizer == speedrun.DEFAULT_TOKENIZER:
        assert recipe_runs == ["recipe_zh_default_lr0.003_10min"]
        assert "not scored" not in table and "(b) / (a) = **0.500x**" in table  # 4.0 / 8.0
    else:
        assert recipe_runs == ["recipe_zh_default_bpe12288_lr0.003_10min", "recipe_zh_default_lr0.003_10min"]
        assert f"| (b) on {speedrun.DEFAULT_TOKENIZER}, not scored |" in table and "| 4.000 |" in table
        assert "(b) / (a) = **0.625x**" in table  # 5.0 / 8.0: the recipe's own run


def test_the_summary_counts_the_tokens_of_every_process(tmp_path):
    """Two processes of 12 x 64 tokens train 1,536 tokens a step: the table's tokens and characters
    are what the run logged, not one process's batch."""
    import json

    import train
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    train_split = dict(documents=10, characters=990, bytes=2970, tokens=500)  # 2 characters per token, eot included
    (data_dir / "meta.json").write_text(json.dumps(dict(vocab_size=300, splits=dict(train=train_split))), encoding="utf-8")
    config = dict(train.DEFAULTS, n_layer=1, n_head=2, n_embd=32, block_size=64, batch_size=12, data_dir=str(data_dir))
    events = [dict(event="config", config=config, machine="a test CPU"),
              *(dict(event="train", iter=i, time_ms=100.0, tokens_per_sec=2 * 12 * 64 / 0.1) for i in (10, 20)),
              dict(event="eval", iter=20, val_bpc=5.5, val_loss=3.8, val_sources=dict(news=dict(loss=3.5, bpb=1.7, bpc=5.2, tokens=90))),
              dict(event="time_budget_end", iter=20, elapsed_seconds=2.5, budget_seconds=3.0, decay_finished=False)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    score = dict(val_bpc=5.4, val_loss=3.7, tokens=400, dtype="float32", seconds=1.0, sources=dict(news=5.1))
    (tmp_path / speedrun.SCORE_FILE).write_text(json.dumps(score), encoding="utf-8")
    summary = speedrun.summary(str(tmp_path))
    assert summary["steps"] == 20 and summary["tokens"] == 20 * 2 * 12 * 64
    assert summary["characters"] == pytest.approx(summary["tokens"] * 2)
    assert not summary["planned"]  # the run's end says its decay did not finish
    # the table's score is the whole val split's after the budget, not the run's own last evaluation
    assert summary["val_bpc"] == 5.4 and summary["val_sources"] == dict(news=5.1)


def test_a_run_is_scored_after_its_budget_on_the_whole_val_split_as_eval_py_does(two_source_run, tmp_path):
    """score_val on a run whose own last evaluation read the whole val split (--val_full_split=True):
    the same bits per character, overall and per source, in val_score.json."""
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_source_run, run)
    speedrun.score_val(str(run))
    score = json.loads((run / speedrun.SCORE_FILE).read_text(encoding="utf-8"))
    logged = read_events(run, "eval")[-1]
    assert score["val_bpc"] == pytest.approx(logged["val_bpc"], rel=1e-6)
    assert score["sources"] == pytest.approx({name: s["bpc"] for name, s in logged["val_sources"].items()}, rel=1e-6)
    assert set(score["sources"]) == {"news", "novel"} and score["dtype"] == "float32"


def test_a_second_speedrun_on_the_same_folder_or_a_live_run_folder_is_refused_and_left_alone(fake_training, tmp_path, monkeypatch):
    """A second `python -m logs.speedrun` on a folder in use would remove the first one's live runs
    to start them again: it is refused in one line, as is a run folder that a train.py holds."""
    from opengpt import folder_lock
    from opengpt.cli import UserError

    first = folder_lock.FolderLock(str(tmp_path), "python -m logs.speedrun", inside=True)
    monkeypatch.setattr(sys, "argv", ["speedrun.py", f"--out={tmp_path}"])
    with pytest.raises(UserError, match="is being written by another python -m logs.speedrun"):
        speedrun.main()
    first.release()
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()  # the real budget_run, on a run folder a train.py holds
    live = tmp_path / "runs" / "nanogpt_lr0.001_2min"
    live.mkdir(parents=True)
    (live / "metrics.jsonl").write_text('{"event": "config"}\n', encoding="utf-8")
    held = folder_lock.FolderLock(str(live), "train.py", inside=True)
    cfg = dict(speedrun.DEFAULTS, out=str(tmp_path))
    with pytest.raises(UserError, match="is being written by another train.py"):
        speedrun.budget_run(cfg, "nanogpt_lr0.001_2min", speedrun.TINY, [], 2.0)
    held.release()
    assert (live / "metrics.jsonl").read_text(encoding="utf-8") == '{"event": "config"}\n'


@pytest.mark.parametrize("args, words", [
    (["--sweep_minutes=-1"], "--sweep_minutes=-1 must be above 0"),
    (["--minutes=0"], "--minutes=0 must be above 0"),
    (["--out=/etc/passwd/x"], "cannot write in --out=/etc/passwd/x"),
])
def test_minutes_and_an_out_that_cannot_be_a_folder_are_one_line_errors_before_any_run(fake_training, tmp_path, monkeypatch,
                                                                                       args, words):
    from opengpt.cli import UserError
    monkeypatch.setattr(sys, "argv", ["speedrun.py", "--section=speedrun", f"--out={tmp_path}", *args])
    with pytest.raises(UserError, match=words):
        speedrun.main()
    assert fake_training == [] and list(tmp_path.iterdir()) == []


def test_a_failed_run_and_a_table_with_no_finished_run_are_one_line_errors(monkeypatch, tmp_path):
    from opengpt.cli import UserError

    def budget_run(cfg, name, config_file, args, minutes):
        raise speedrun.RunFailed(f"run {name} failed (exit 2): train.py: error: --max_minutes=0.05 leaves room for 2 steps")

    monkeypatch.setattr(speedrun, "budget_run", budget_run)
    monkeypatch.setattr(speedrun, "ensure_data", lambda flags, folder: folder)
    assert issubclass(speedrun.RunFailed, UserError)  # run(main) says it in one line
    with pytest.raises(UserError, match="no run of the tokenizer table finished; GPT-2 BPE: --max_minutes=0.05 leaves room"):
        speedrun.tokenizer_table(dict(speedrun.DEFAULTS))
