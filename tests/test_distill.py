"""Distillation smoke test: a few steps on a few sentences lower the loss; checkpoints round-trip."""

import torch

from encoder import distill
from encoder.ternary import ternarize_model

SENTENCES = [
    "The Hunger Games by Suzanne Collins. young adult, dystopia, fiction",
    "Catching Fire by Suzanne Collins. young adult, dystopia, fiction",
    "A man is playing a guitar.",
    "Pride and Prejudice by Jane Austen. classics, romance",
    "Vitamin D deficiency is associated with higher mortality.",
    "A woman is slicing an onion.",
]


def _cfg(**kw):
    return {**distill.config, "w_hid": 1.0, "layers": "all", "w_cos": 1.0, "w_sim": 1.0, "w_att": 0.0, **kw}


def test_a_few_steps_lower_the_loss():
    from sentence_transformers import SentenceTransformer

    from encoder.loading import default_base_model

    torch.manual_seed(0)
    teacher_st = SentenceTransformer(default_base_model(), device="cpu").eval()
    student_st = ternarize_model(SentenceTransformer(default_base_model(), device="cpu"), "row_opt")
    teacher, student = teacher_st[0].auto_model, student_st[0].auto_model
    for p in teacher.parameters():
        p.requires_grad_(False)
    tok = dict(teacher_st.tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    cfg = _cfg()
    params = [p for n, p in student.named_parameters() if not n.startswith("embeddings")]
    opt = torch.optim.AdamW(params, lr=1e-4)
    losses = []
    for _ in range(6):
        loss = distill.compute_losses(student, teacher, tok, cfg)
        losses.append({k: v.item() for k, v in loss.items()})
        opt.zero_grad()
        loss["total"].backward()
        opt.step()
    final = {k: v.item() for k, v in distill.compute_losses(student, teacher, tok, cfg).items()}
    assert final["total"] < 0.7 * losses[0]["total"], (losses, final)
    assert final["hid"] < losses[0]["hid"] and final["cos"] < losses[0]["cos"]


def test_losses_are_zero_for_the_teacher_itself():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=20), add_pooling_layer=False).eval()
    ids = torch.randint(1, 40, (4, 6))
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0  # padding must not count
    losses = distill.compute_losses(model, model, {"input_ids": ids, "attention_mask": mask},
                                    _cfg(w_att=0.0))
    for k in ("hid", "cos", "sim"):
        assert abs(losses[k].item()) < 1e-5, k


def test_lr_schedule_warms_up_and_decays():
    cfg = _cfg(lr=1e-3, warmup_steps=10, min_lr_frac=0.1)
    assert distill.lr_at(0, 0.0, cfg) == 1e-4
    assert distill.lr_at(10, 0.0, cfg) == 1e-3
    assert abs(distill.lr_at(500, 1.0, cfg) - 1e-4) < 1e-12


def test_checkpoint_round_trip(tmp_path):
    from transformers import BertConfig, BertModel

    def make():
        torch.manual_seed(0)
        m = BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=20))
        ternarize_model(m, "row_opt+learn")
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3)

    model, opt = make()
    ids = torch.randint(1, 40, (2, 5))
    model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
    opt.step()
    distill.save_checkpoint(tmp_path, model, opt, {"step": 1, "elapsed": 2.0, "history": []})
    model2, opt2 = make()
    meta = distill.load_checkpoint(tmp_path, model2, opt2)
    assert meta["step"] == 1
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert torch.equal(s1[0]["exp_avg"], s2[0]["exp_avg"]) and float(s1[0]["step"]) == float(s2[0]["step"])
