"""TRL interop: an exported byollm model trains with TRL's SFTTrainer and DPOTrainer and comes back.

The references are TRL and transformers themselves: TRL's assistant-only labels must be our `encode_chat`
labels, the loss TRL computes on a batch must be a masked cross-entropy of *our* model on the same batch,
DPO's first loss must be ln 2 (policy == reference), and the TRL-trained directory must convert back into a
byollm checkpoint that computes the transformers model's logits and greedy replies. Tiny models, CPU, no
download.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from byollm.chat import ChatSession
from byollm.checkpoint import load_checkpoint
from byollm.data.instruct import Conversation, PreferencePair
from byollm.generate import generate
from byollm.interop.convert import convert_from_hf
from byollm.interop.hf import export_hf, load_hf_dir
from byollm.model import GPT
from byollm.model.config import preset
from byollm.sampling import SamplingParams
from byollm.tokenizer import BPETokenizer, Tokenizer
from byollm.tokenizer.chat_template import (
    END,
    IGNORE_INDEX,
    add_chat_tokens,
    encode_chat,
    encode_prompt,
    encode_response,
)

pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from byollm.interop.trl import dpo_trainer, sft_trainer, trl_dpo, trl_sft  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

WORDS = "red green blue one two three cat dog sun moon yes no hello world".split()
CONVERSATIONS = [
    Conversation([*([{"role": "system", "content": "Be brief."}] if i % 4 == 0 else []),
                  {"role": "user", "content": f"Say {WORDS[i % 14]}."},
                  {"role": "assistant", "content": f"{WORDS[i % 14]} {WORDS[(3 * i + 1) % 14]}"}], i)
    for i in range(16)
]
PAIRS = [PreferencePair([{"role": "user", "content": f"Say {w}."}], f"{w}!", f"no {w}", i)
         for i, w in enumerate(WORDS[:8])]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    # Byte-level BPE: TRL probes the template with text ("dummy") that a char tokenizer could not encode.
    text = " ".join(m["content"] for c in CONVERSATIONS for m in c.messages)
    t = BPETokenizer.train(text * 3, vocab_size=280)
    add_chat_tokens(t)
    return t


@pytest.fixture(scope="module", params=["llama-tiny", "gpt-tiny"])
def hf_dir(request: pytest.FixtureRequest, tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = GPT(preset(request.param, vocab_size=tok.vocab_size))  # vocab covers the chat tokens
    return export_hf(model, tmp_path_factory.mktemp(request.param) / "hf", tok)


def _masked_loss(model: GPT, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of our model over the tokens whose label is not -100 (written here)."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="sum")
    return nll / (targets != IGNORE_INDEX).sum()


def test_sft_labels_and_loss_are_ours(hf_dir: Path, tok: Tokenizer, tmp_path: Path) -> None:
    trainer = sft_trainer(hf_dir, CONVERSATIONS, tmp_path / "sft", steps=1, batch_size=4)
    # (1) TRL's tokenised dataset (assistant_only_loss via our {% generation %} blocks) == encode_chat.
    rows = trainer.train_dataset
    assert len(rows) == len(CONVERSATIONS)
    for conv, row in zip(CONVERSATIONS, rows, strict=True):
        ids, labels = encode_chat(tok, conv.messages)
        assert row["input_ids"] == ids
        if "labels" in row:  # TRL >= 1.x builds the labels in the dataset; older TRL kept the mask
            assert row["labels"] == labels
        else:
            assert row["assistant_masks"] == [int(lab != IGNORE_INDEX) for lab in labels]
    # (2) The loss TRL computes on a (padded) batch == our model's masked cross-entropy on that batch.
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["attention_mask"] == 0).any()  # right padding is part of what is compared
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, dict(batch)).item()
        ours = _masked_loss(load_hf_dir(hf_dir)[0], batch).item()
    assert abs(theirs - ours) < 1e-4, (theirs, ours)


def test_sft_then_dpo_then_back_to_byollm(hf_dir: Path, tok: Tokenizer, tmp_path: Path) -> None:
    # SFT: 3 steps, finite losses, the weights moved.
    sft = trl_sft(hf_dir, CONVERSATIONS, tmp_path / "sft", steps=3, batch_size=4, lr=1e-3)
    losses = sft.losses()
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    before, after = load_file(str(hf_dir / "model.safetensors")), load_file(str(sft.out_dir / "model.safetensors"))
    assert before.keys() == after.keys()
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-4

    # DPO on the SFT model: TRL's prompt/completion ids are ours; the first loss is ln 2 (policy == reference).
    trainer = dpo_trainer(sft.out_dir, PAIRS, tmp_path / "dpo", steps=3, batch_size=4, beta=0.1)
    for pair, row in zip(PAIRS, trainer.train_dataset, strict=True):
        assert row["prompt_ids"] == encode_prompt(tok, pair.prompt)
        assert row["chosen_ids"] == encode_response(tok, pair.chosen)
        assert row["rejected_ids"] == encode_response(tok, pair.rejected)
    dpo = trl_dpo(sft.out_dir, PAIRS, tmp_path / "dpo", steps=3, batch_size=4, beta=0.1, lr=1e-4)
    logs = [e for e in dpo.log_history if "loss" in e]
    assert len(logs) == 3
    assert abs(logs[0]["loss"] - math.log(2)) < 1e-3, logs[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert all(key in e and math.isfinite(e[key]) for e in logs), key
    assert logs[0]["rewards/margins"] == 0.0

    # Back to byollm: our checkpoint computes the transformers model's logits and greedy reply.
    ckpt = convert_from_hf(dpo.out_dir, tmp_path / "ckpt")
    loaded = load_checkpoint(ckpt)
    model, ours_tok = loaded.model, loaded.tokenizer
    assert ours_tok is not None and ours_tok.special_tokens == tok.special_tokens and ours_tok.eos_token == END
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(dpo.out_dir), dtype=torch.float32).eval()
    ids = torch.tensor([encode_chat(tok, CONVERSATIONS[0].messages)[0]])
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert diff < 1e-4, diff

    prompt = encode_prompt(ours_tok, PAIRS[0].prompt)
    end = ours_tok.special_tokens[END]
    mine = generate(model, prompt, SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[end]))[0]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, eos_token_id=end,
                             pad_token_id=ours_tok.pad_id)[0, len(prompt):].tolist()
    assert mine.token_ids == theirs
    session = ChatSession(model, ours_tok, SamplingParams(max_new_tokens=6, temperature=0))
    assert "".join(session.reply(PAIRS[0].prompt[0]["content"])) == ours_tok.decode([t for t in theirs if t != end])
