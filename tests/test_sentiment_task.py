"""logs/sentiment_task.py: the task's data (dedup, a split by review, chat records), the baselines and
the scoring, on small hand-made sets; the base model's label scores against a hand computation."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_user_error, run_script
from logs import sentiment_task as task
from model import GPT, GPTConfig
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


def test_the_split_is_by_review_and_the_same_whatever_the_order_of_the_reviews():
    reviews = [(f"评论{i}", POS if i % 3 else NEG) for i in range(100)]
    train, test = task.split_reviews(reviews, 20, seed=7)
    assert len(test) == 20 and len(train) == 80
    assert not {text for text, _ in train} & {text for text, _ in test}
    assert sorted(train + test) == sorted(reviews)
    assert task.split_reviews(list(reversed(reviews)), 20, seed=7) == (train, test)
    assert task.split_reviews(reviews, 20, seed=8)[1] != test


def test_the_split_refuses_a_test_part_that_leaves_no_train_part():
    with pytest.raises(task.UserError, match="between 1 and 2"):
        task.split_reviews([("a", POS), ("b", NEG), ("c", POS)], 3, seed=0)


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
