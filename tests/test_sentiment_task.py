"""logs/sentiment_task.py: the task's data (dedup, a split by review, chat records), the baselines and
the scoring, on small hand-made sets; the base model's label scores against a hand computation."""
import json

import pytest
import torch
import torch.nn.functional as F

from chat_checkpoint import write_chat_checkpoint
from conftest import assert_user_error, run_script
from logs import sentiment_task as task
from model import GPT, GPTConfig
from opengpt import chat_model
from opengpt.chat_format import parse_conversation

POS, NEG = task.LABELS


def test_deduplicate_keeps_each_text_once_and_drops_a_text_under_both_labels():
    labelled = [("好书", POS), ("差评", NEG), ("好书", POS), ("一般", POS), ("一般", NEG), ("差评", NEG), ("差评", NEG)]
    reviews, counts = task.deduplicate(labelled)
    assert reviews == [("好书", POS), ("差评", NEG)]
    assert counts == dict(lines=7, repeats=3, conflicting=1, reviews=2)


def test_read_labelled_lines_strips_lines_and_skips_blank_ones(tmp_path):
    (tmp_path / "pos.txt").write_text("很好 \n\n  \n不错\n", encoding="utf-8")
    (tmp_path / "neg.txt").write_text("太差\r\n", encoding="utf-8")
    labelled = task.read_labelled_lines({POS: tmp_path / "pos.txt", NEG: tmp_path / "neg.txt"})
    assert labelled == [("很好", POS), ("不错", POS), ("太差", NEG)]


def test_the_split_is_by_review_into_three_disjoint_parts_the_same_whatever_the_order_of_the_reviews():
    reviews = [(f"评论{i}", POS if i % 3 else NEG) for i in range(100)]
    train, validation, test = task.split_reviews(reviews, 20, 10, seed=7)
    assert len(test) == 20 and len(validation) == 10 and len(train) == 70
    parts = [{text for text, _ in part} for part in (train, validation, test)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert sorted(train + validation + test) == sorted(reviews)
    assert task.split_reviews(list(reversed(reviews)), 20, 10, seed=7) == (train, validation, test)
    assert task.split_reviews(reviews, 20, 10, seed=8)[2] != test
    assert task.split_reviews(reviews, 20, 30, seed=7)[2] == test  # the test part does not move with the validation part's size


def test_the_split_refuses_parts_that_leave_no_train_part():
    reviews = [("a", POS), ("b", NEG), ("c", POS), ("d", NEG)]
    with pytest.raises(task.UserError, match="--test_reviews=4: give between 1 and 3"):
        task.split_reviews(reviews, 4, 1, seed=0)
    with pytest.raises(task.UserError, match="--validation_reviews=2: give between 1 and 1"):
        task.split_reviews(reviews, 2, 2, seed=0)
    with pytest.raises(task.UserError, match="--validation_reviews=0"):
        task.split_reviews(reviews, 2, 0, seed=0)


def test_the_choice_sees_the_validation_part_only_and_takes_the_best_score_first_on_a_tie():
    reviews = [(f"评论{i}", POS if i % 2 else NEG) for i in range(50)]
    train, validation, test = task.split_reviews(reviews, 10, 8, seed=0)
    candidates = task.sft_grid(dict(grid_learning_rates="5e-4,1e-3,2e-3", grid_iters="540", grid_variants=""))
    fake = {5e-4: 0.6, 1e-3: 0.8, 2e-3: 0.8}  # a tie: the first in grid order wins
    seen = []

    def accuracy_of(candidate, scored):
        seen.extend(scored)
        return dict(accuracy=fake[candidate["learning_rate"]])

    best, scores = task.choose(candidates, validation, accuracy_of)
    assert candidates[best]["learning_rate"] == 1e-3
    assert [s["accuracy"] for s in scores] == [0.6, 0.8, 0.8]
    assert seen == validation * 3 and not set(seen) & set(test)
    assert task.choose(candidates, validation, lambda c, _: dict(accuracy=c["learning_rate"]))[0] == 2


def test_the_grid_tries_every_learning_rate_at_the_shorter_length_first():
    grid = task.sft_grid(dict(grid_learning_rates="1e-3,2e-3", grid_iters="540,1080", grid_variants="|--flag=True"))
    assert [(c["iters"], c["flags"], c["learning_rate"]) for c in grid] == [
        (540, [], 1e-3), (540, [], 2e-3), (540, ["--flag=True"], 1e-3), (540, ["--flag=True"], 2e-3),
        (1080, [], 1e-3), (1080, [], 2e-3), (1080, ["--flag=True"], 1e-3), (1080, ["--flag=True"], 2e-3)]
    assert [c["name"] for c in grid[:3]] == ["lr0.001_iters540", "lr0.002_iters540", "lr0.001_iters540_flag-True"]
    assert len({c["name"] for c in grid}) == len(grid)
    for bad in ("", "1e-3,x", "0"):
        with pytest.raises(task.UserError, match="grid_learning_rates"):
            task.sft_grid(dict(grid_learning_rates=bad, grid_iters="540", grid_variants=""))


def test_each_jsonl_line_is_a_conversation_chat_format_reads(tmp_path):
    reviews = [("质量很好，\n下次还买", POS), ("送货太慢", NEG)]
    path = tmp_path / "train.jsonl"
    task.write_jsonl(str(path), reviews)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    for number, ((text, label), line) in enumerate(zip(reviews, lines), 1):
        messages = parse_conversation(json.loads(line), f"line {number}")
        assert messages == [{"role": "user", "content": f"评论：{text}\n这条评论是正面还是负面？"},
                            {"role": "assistant", "content": label}]


def test_an_answer_counts_only_when_it_is_exactly_the_label():
    answers = [POS, NEG, f"{POS} ", f"{NEG}。", "不知道", POS]
    labels = [POS, POS, POS, NEG, NEG, POS]
    assert task.score_answers(answers, labels) == dict(n=6, correct=2, neither=3, accuracy=2 / 6)


def test_majority_answers_the_train_parts_most_common_label():
    train = [("a", NEG), ("b", NEG), ("c", POS)]
    assert task.majority_answers(train, [("x", POS), ("y", NEG)]) == [NEG, NEG]
    assert task.majority_answers([("a", POS), ("b", NEG)], [("x", NEG)]) == [POS]  # a tie: the first label


def test_bag_of_words_separates_a_set_a_single_character_separates():
    fillers = ["这本书", "手机", "酒店的房间", "快递", "屏幕", "价格", "服务", "包装"]
    train = [(f"{f}{w}", label) for f in fillers for w, label in (("好", POS), ("很好", POS), ("差", NEG), ("太差", NEG))]
    test = [("衣服好", POS), ("电脑差", NEG), ("味道很好", POS), ("速度太差", NEG)]
    answers, c = task.bag_of_words_answers(train, test)
    assert answers == [POS, NEG, POS, NEG]
    assert c in (1.0, 3.0, 10.0, 30.0)


def test_clip_to_fit_keeps_the_longest_end_that_fits():
    review = "一二三四五六七八九十"
    assert task.clip_to_fit(review, lambda text: len(text) <= 10) == review
    assert task.clip_to_fit(review, lambda text: len(text) <= 4) == task.CLIP_MARK + "八九十"
    assert task.clip_to_fit(review, lambda text: len(text) <= 1) == task.CLIP_MARK
    with pytest.raises(ValueError):
        task.clip_to_fit(review, lambda text: False)


def test_label_log_probs_are_the_summed_log_softmax_of_the_labels_tokens():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=32, dropout=0.0)).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    labels = [[11], [12, 13]]
    scores = task.label_log_probs(model, prompts, labels, "cpu", batch_size=4)  # rows of two lengths in one batch
    for i, prompt in enumerate(prompts):
        for j, label in enumerate(labels):
            ids = torch.tensor([prompt + label])
            with torch.no_grad():
                log_probs = F.log_softmax(model.full_logits(ids)[0].double(), dim=-1)
            expected = sum(log_probs[len(prompt) - 1 + k, token] for k, token in enumerate(label))
            assert scores[i, j].item() == pytest.approx(expected.item(), abs=1e-5)


def test_few_shot_examples_are_short_train_reviews_with_labels_taking_turns():
    train = [(f"好{i}", POS) for i in range(5)] + [(f"差{i}", NEG) for i in range(5)] + [("很长" * 20, POS)]
    examples = task.few_shot_examples(train, 4, 5, seed=0)
    assert [label for _, label in examples] == [POS, NEG, POS, NEG]
    assert all((text, label) in train and len(text) <= 5 for text, label in examples)
    assert len(set(examples)) == 4


def test_a_test_part_as_large_as_the_data_is_one_line(tmp_path):
    result = run_script("logs/sentiment_task.py", "--steps=", "--test_reviews=10000000", f"--out={tmp_path / 'out'}",
                        f"--work={tmp_path / 'work'}", cwd=tmp_path, timeout=300)
    assert_user_error(result, "--test_reviews=10000000", "between 1 and")


def test_batched_chat_answers_are_the_one_at_a_time_greedy_answers(tmp_path):
    chat = chat_model.load(write_chat_checkpoint(tmp_path / "out-chat"), device="cpu")
    reviews = [("好", POS), ("这本书写得很好，我很喜欢。" * 6, NEG), ("质量差", NEG), ("不错" * 3, POS), ("一般般吧", POS)]  # one clipped to fit
    assert task.batched_chat_answers(chat, reviews, batch_size=2) == task.chat_answers(chat, reviews)
    # <|im_end|>'s row thrice a token's that the model draws: it ends its turn where it would have drawn
    # that token, at once for the first review (an empty answer), later or never for others
    first_token = chat.tokenizer.encode(task.chat_answers(chat, reviews[:1])[0])[0]
    with torch.no_grad():
        chat.model.transformer.wte.weight[chat.stop_ids[0]] = 3 * chat.model.transformer.wte.weight[first_token]
    chat = chat_model.ChatModel(chat.model, chat.tokenizer, chat.device, chat.dtype)  # its decoder copies the head
    answers = task.chat_answers(chat, reviews)
    assert answers[0] == "" and any(answers[1:])
    assert task.batched_chat_answers(chat, reviews, batch_size=3) == answers


def test_the_report_lists_each_candidates_validation_score_and_the_chosen_one():
    score = dict(n=10, correct=7, neither=1, accuracy=0.7)
    grid = task.sft_grid(dict(grid_learning_rates="1e-3,2e-3", grid_iters="540", grid_variants="|--document_mask=True"))
    facts = dict(counts=dict(lines=30, repeats=5, conflicting=1, reviews=24), train=4, validation=10, test=10,
                 train_shares={POS: 0.5, NEG: 0.5}, test_shares={POS: 0.4, NEG: 0.6}, notes=["a note"],
                 grid=[(c, score, i == 1) for i, c in enumerate(grid)])
    text = task.report(dict(seed=1), facts, [("majority", score)], [["train.py", "--x=1"]])
    assert "4 train, 10 validation and 10 test reviews" in text
    assert "| 0.002 | 540 | - | 70.0% | 7 / 10 | 1 | yes |" in text
    assert "| 0.001 | 540 | --document_mask=True | 70.0% | 7 / 10 | 1 |  |" in text
    assert "| majority | 70.0% | 7 / 10 | 1 |" in text and "    python train.py --x=1" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has the CUDA GPU this refusal is about")
def test_a_device_this_machine_lacks_is_one_line_before_any_work(tmp_path):
    result = run_script("logs/sentiment_task.py", "--device=cuda", f"--out={tmp_path / 'out'}", f"--work={tmp_path / 'work'}")
    assert_user_error(result, "--device=cuda but this machine has no CUDA GPU")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["out", "work"])
def test_an_out_or_work_folder_under_a_file_is_one_line(tmp_path, key):
    (tmp_path / "file").write_text("", encoding="utf-8")
    folders = dict(out=tmp_path / "out", work=tmp_path / "work") | {key: tmp_path / "file" / "x"}
    result = run_script("logs/sentiment_task.py", f"--out={folders['out']}", f"--work={folders['work']}")
    assert_user_error(result, f"cannot make --{key}={tmp_path / 'file' / 'x'}")
