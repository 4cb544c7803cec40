"""Distillation: losses (zero for the teacher itself, listwise self-exclusion), length buckets, teacher
targets read back as the teacher computes them, a few steps lower the loss, checkpoints round-trip,
and the catalog hold-out never reaches the training text."""

import random

import numpy as np
import pytest
import torch

from encoder import distill
from encoder.teacher_targets import build_teacher_targets
from encoder.ternary import ternarize_model


def _cfg(**kw):
    return {**distill.config, "w_hid": 1.0, "layers": "all", "w_cos": 1.0, "w_sim": 1.0, "w_list": 1.0, **kw}


def _tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=20), add_pooling_layer=False).eval()


class _Tokenizer:
    """Whitespace tokenizer over a tiny vocabulary, the call shape of a HF tokenizer."""

    def __call__(self, texts, truncation, max_length, padding):
        ids = [[1] + [2 + (sum(map(ord, w)) % 37) for w in t.split()][: max_length - 2] + [39] for t in texts]
        return {"input_ids": ids}


TEXTS = ["a b c", "d e", "f g h i j", "k", "l m n o", "p q r s t u v w", "x y", "z a b"]


def _targets(model, tmp_path, max_lens=None):
    return build_teacher_targets(model, _Tokenizer(), TEXTS, max_lens or [6] * len(TEXTS), "tiny", root=tmp_path,
                                 batch_tokens=12, log=lambda *_: None)


def _parts(targets, groups):
    return [targets.batch(g) for g in groups]


def test_teacher_targets_are_the_teachers_outputs_and_are_reused(tmp_path):
    model = _tiny_bert()
    targets = _targets(model, tmp_path)
    assert list(targets.lengths) == [min(len(t.split()), 4) + 2 for t in TEXTS]  # truncated at 6 tokens
    part = targets.batch([2, 3, 5])
    out = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], output_hidden_states=True)
    real = part["attention_mask"].bool()
    for layer in range(2):
        torch.testing.assert_close(part["hidden"][layer][real], out.hidden_states[layer + 1][real],
                                   atol=2e-3, rtol=2e-3)  # stored as float16
        assert (part["hidden"][layer][~real] == 0).all()
    pooled = torch.nn.functional.normalize(distill.mean_pool(out.last_hidden_state, part["attention_mask"]), dim=-1)
    torch.testing.assert_close(torch.from_numpy(targets.pooled[[2, 3, 5]]), pooled, atol=1e-5, rtol=1e-5)
    again = _targets(_tiny_bert(), tmp_path)  # same weights, texts and lengths: the same directory
    assert again.directory == targets.directory
    other = _targets(_tiny_bert(), tmp_path, [3] * len(TEXTS))  # other truncation: another key
    assert other.directory != targets.directory and other.lengths.max() == 3


def test_losses_are_zero_for_the_teacher_itself(tmp_path):
    model = _tiny_bert()
    targets = _targets(model, tmp_path)
    groups = [[0, 1, 3], [2, 4, 6, 7]]
    order = torch.tensor([i for g in groups for i in g])
    bank = torch.from_numpy(targets.pooled)
    losses = distill.compute_losses(model, _parts(targets, groups), bank[order], _cfg(), bank, order, 1.0)
    for k in ("hid", "cos", "sim", "list"):
        assert abs(losses[k].item()) < 1e-4, (k, losses[k].item())


def test_listwise_loss_leaves_each_texts_own_bank_row_out():
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    teacher = bank[[3, 7]].clone()
    student = teacher + 0.3 * torch.randn(2, 8)
    # leaving row j out == the same loss over a bank without row j
    for r, j in enumerate((3, 7)):
        out = distill.listwise_kl(student[r:r + 1], teacher[r:r + 1], bank, torch.tensor([j]), 0.05)
        rest = torch.cat([bank[:j], bank[j + 1:]])
        expected = distill.listwise_kl(student[r:r + 1], teacher[r:r + 1], rest, torch.tensor([-1]), 0.05)
        torch.testing.assert_close(out, expected)
        assert out.item() > 1e-3  # a different student is penalised
    # and it is a KL: zero when the student equals the teacher
    assert distill.listwise_kl(teacher, teacher, bank, torch.tensor([3, 7]), 0.05).item() == pytest.approx(0, abs=1e-6)


def test_length_buckets_cover_the_batch_with_the_least_padding():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(8, 14, 20), rng.integers(30, 40, 8), [64, 64, 63, 60]])
    idx = list(rng.permutation(len(lengths)))
    one = distill.split_by_length(idx, lengths, 1)
    three = distill.split_by_length(idx, lengths, 3)
    assert sorted(i for g in three for i in g) == sorted(idx) and len(three) <= 3

    def padded(groups):
        return sum(len(g) * max(lengths[i] for i in g) for g in groups)

    assert padded(three) < 0.5 * padded(one)
    assert all(len(g) >= 4 for g in three)


SENTENCES = [
    "The Hunger Games by Suzanne Collins. young adult, dystopia, fiction",
    "Catching Fire by Suzanne Collins. young adult, dystopia, fiction",
    "A man is playing a guitar.",
    "Pride and Prejudice by Jane Austen. classics, romance",
    "Vitamin D deficiency is associated with higher mortality.",
    "A woman is slicing an onion.",
]


def test_a_few_steps_lower_the_loss(tmp_path):
    from sentence_transformers import SentenceTransformer

    from encoder.base_model import default_base_model

    torch.manual_seed(0)
    teacher = SentenceTransformer(default_base_model(), device="cpu").eval()
    targets = build_teacher_targets(teacher[0].auto_model, teacher.tokenizer, SENTENCES, [64] * 6, "minilm",
                                    root=tmp_path, log=lambda *_: None)
    student = ternarize_model(SentenceTransformer(default_base_model(), device="cpu"), "row_opt")[0].auto_model
    groups = [[0, 1, 3], [2, 4, 5]]
    order = torch.tensor([i for g in groups for i in g])
    bank = torch.from_numpy(targets.pooled)
    params = [p for n, p in student.named_parameters() if not n.startswith("embeddings")]
    opt = torch.optim.AdamW(params, lr=1e-4)
    losses = []
    for _ in range(6):
        loss = distill.compute_losses(student, _parts(targets, groups), bank[order], _cfg(), bank, order, 1.0)
        losses.append({k: v.item() for k, v in loss.items()})
        opt.zero_grad()
        loss["total"].backward()
        opt.step()
    final = {k: v.item() for k, v in
             distill.compute_losses(student, _parts(targets, groups), bank[order], _cfg(), bank, order, 1.0).items()}
    assert final["total"] < 0.7 * losses[0]["total"], (losses, final)
    assert final["hid"] < losses[0]["hid"] and final["cos"] < losses[0]["cos"]


def test_neighbour_batches_stay_within_a_kind():
    by_kind = {"item": [f"item {i}" for i in range(30)], "title_authors": [f"ta {i}" for i in range(30)],
               "general": [f"g {i}" for i in range(40)]}
    pool = distill.Pool(by_kind, distill.config)
    rng = np.random.default_rng(0)
    pool.find_neighbours(np.asarray(rng.normal(size=(100, 8)), dtype=np.float32))
    batch = pool.batch(random.Random(0), distill.config)
    assert len(batch) == distill.config["batch_size"]
    n_cat = distill.config["catalog_groups"] * distill.config["group_members"]
    for g in range(distill.config["catalog_groups"]):
        members = batch[g * distill.config["group_members"]:(g + 1) * distill.config["group_members"]]
        assert len({int(pool.kind[i]) for i in members}) == 1 and pool.kind[members[0]] in (0, 1)
        assert set(members[1:]) <= set(pool.neighbours[int(pool.kind[members[0]])].ravel())
    assert all(pool.kind[i] == 2 for i in batch[n_cat:])


def test_training_text_never_contains_a_heldout_item():
    from encoder.data import catalog_texts, heldout_item_ids, training_texts

    ids, items, short = catalog_texts()
    held = heldout_item_ids()
    assert len(held) == len(ids) // 5 and held <= set(ids)
    texts = training_texts(distill.default_data_dir())
    assert len(texts["item"]) == len(texts["title_authors"]) == len(ids) - len(held)
    every = set(texts["item"]) | set(texts["title_authors"]) | set(texts["general"])
    for kind in (items, short):
        # texts of held-out books (unless a training book has the very same text)
        only_held = {t for i, t in zip(ids, kind, strict=True) if i in held} - \
            {t for i, t in zip(ids, kind, strict=True) if i not in held}
        assert len(only_held) > 1900 and not only_held & every


def test_lr_schedule_warms_up_and_decays():
    cfg = _cfg(lr=1e-3, warmup_steps=10, min_lr_frac=0.1)
    assert distill.lr_at(0, 0.0, cfg) == 1e-4
    assert distill.lr_at(10, 0.0, cfg) == 1e-3
    assert abs(distill.lr_at(500, 1.0, cfg) - 1e-4) < 1e-12


def test_checkpoint_round_trip(tmp_path):
    def make():
        model = ternarize_model(_tiny_bert(), "row_opt+learn")
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    model, opt = make()
    with torch.no_grad():
        model.encoder.layer[0].output.dense.row_ratio.mul_(0.9)  # a fitted threshold must survive too
    ids = torch.randint(1, 40, (2, 5))
    model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
    opt.step()
    distill.save_checkpoint(tmp_path, model, opt, {"step": 1, "elapsed": 2.0, "history": []})
    model2, opt2 = make()
    meta = distill.load_checkpoint(tmp_path, model2, opt2)
    assert meta["step"] == 1
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    for (n, b), (_, c) in zip(model.named_buffers(), model2.named_buffers(), strict=True):
        assert torch.equal(b, c), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert torch.equal(s1[0]["exp_avg"], s2[0]["exp_avg"]) and float(s1[0]["step"]) == float(s2[0]["step"])
