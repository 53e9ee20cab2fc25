"""Regrouping micro-batches (worker/autotune.py) on the real tiny Llama: one forward over joined
micro-batches gives the sum of their token-normalised losses, with 2D masks and with LlamaFactory's own
4D neat-packing mask, and a cut batch gives its pieces back."""

from __future__ import annotations

import torch
from ft_appliance.worker.autotune import concat, split
from llamafactory.data.collator import prepare_4d_attention_mask
from transformers import LlamaConfig, LlamaForCausalLM

from tests.unit.worker.test_attention import TINY


def batch(rows: int, length: int, seed: int, four_d: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY["vocab_size"], (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, length - 3 :] = 0  # the collator's right padding
    labels = ids.masked_fill(mask == 0, -100)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if four_d:  # neat packing: two examples per row (indices 1 and 2), padding 0
        indices = mask.clone()
        indices[:, length // 2 :] *= 2
        out["attention_mask"] = prepare_4d_attention_mask(indices, torch.float32)
    return out


def loss_sum(model: torch.nn.Module, inputs: dict[str, torch.Tensor], items: int) -> torch.Tensor:
    return model(**inputs, num_items_in_batch=items).loss


def test_joined_micro_batches_give_the_sum_of_their_losses() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    for four_d in (False, True):
        a, b = batch(2, 24, 1, four_d), batch(2, 17, 2, four_d)  # different lengths: padded to 24
        items = int((a["labels"][:, 1:] != -100).sum() + (b["labels"][:, 1:] != -100).sum())
        joined = concat([a, b])
        assert joined is not None and joined["input_ids"].shape == (4, 24)
        assert (joined["labels"][2:, 17:] == -100).all() and (joined["attention_mask"][2:, ..., 17:] != 1).all()
        apart = loss_sum(model, a, items) + loss_sum(model, b, items)
        torch.testing.assert_close(loss_sum(model, joined, items), apart, rtol=1e-5, atol=1e-6)


def test_concat_refuses_what_it_cannot_join() -> None:
    a, b = batch(2, 8, 1), batch(2, 8, 2)
    b["pixel_values"] = torch.zeros(2, 3)
    assert concat([a, b]) is None
    c = batch(1, 8, 3) | {"position_ids": torch.zeros(1, 8, 2)}
    assert concat([c, c | {"position_ids": torch.zeros(1, 8, 3)}]) is None


def test_split_gives_the_pieces_back() -> None:
    inputs = batch(4, 10, 5) | {"note": "kept"}
    pieces = split(inputs, 2)
    assert [p["input_ids"].shape[0] for p in pieces] == [2, 2] and pieces[1]["note"] == "kept"
    assert torch.equal(torch.cat([p["labels"] for p in pieces]), inputs["labels"])
    assert [p["input_ids"].shape[0] for p in split(batch(3, 4, 6), 2)] == [2, 1]
