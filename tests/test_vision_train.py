"""Fine-tuning with images: chat rows with image parts -> packed vision rows (train.vision_data) -> the trainer's
loss against HF Qwen3_5ForConditionalGeneration per document, and a fine-tuning run training (and freezing
part of) the vision tower."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import write_bpe_tokenizer
from PIL import Image

from qwen35_jax.hf_reference import build_hf_multimodal, save_hf_model
from qwen35_jax.loading import load_model, load_vision_tower
from qwen35_jax.tokenizer import Tokenizer
from qwen35_jax.vision.chat import vision_chat_prompt
from qwen35_jax.vision.processing import processor_configs
from train.config import TrainConfig
from train.data import DataError, load_dataset, tokenize_example
from train.step import Trainer, vision_embeddings
from train.vision_data import VisionData

SMALL_IMAGES = {"size": {"shortest_edge": 4096, "longest_edge": 16384}}  # 64..128 px: 4..16 image tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(HF model, folder): tiny-dense with a vision tower, a BPE tokenizer holding the vision tokens, and a
    preprocessor_config.json for small images."""
    folder = write_bpe_tokenizer(tmp_path_factory.mktemp("mm_train"), vocab_size=300)
    tok = Tokenizer.load(folder)
    ids = {f"{name}_token_id": tok.token_id(f"<|{text}|>") for name, text in
           (("vision_start", "vision_start"), ("vision_end", "vision_end"), ("image", "image_pad"),
            ("video", "video_pad"))}
    model = build_hf_multimodal("tiny-dense", seed=5, token_ids=ids, vocab_size=320)
    save_hf_model(model, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(SMALL_IMAGES))
    return model, folder


def image_file(folder, name, height, width, seed):
    path = folder / name
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def data_file(checkpoint, tmp_path_factory):
    """Three conversations: one image; text only; a system prompt and two images of other sizes."""
    here = tmp_path_factory.mktemp("mm_data")
    a, b, c = (image_file(here, f"{k}.png", h, w, k) for k, (h, w) in enumerate([(64, 64), (96, 64), (64, 128)]))
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "What?"}]},
                      {"role": "assistant", "content": "A red square."}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there."}]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "text", "text": "Compare"},
                                                   {"type": "image_url", "image_url": {"url": f"file://{b}"}},
                                                   {"type": "image", "image": c}]},
                      {"role": "assistant", "content": "The second is wider."}]},
    ]
    path = here / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def vision_data(folder, model=None):
    cfg = (model or load_model(folder)).config.vision
    return VisionData(cfg, *processor_configs(folder))


def test_vision_rows_hold_the_inference_prompt_and_the_text_mask(checkpoint, data_file):
    """Each conversation's tokens are what inference builds for it (placeholders expanded), the learned tokens
    are exactly those of the same conversation without its images, and no placeholder is learned."""
    _, folder = checkpoint
    path, rows = data_file
    tok, vision = Tokenizer.load(folder), vision_data(folder)
    data = load_dataset(path, tok, seq_len=160, vision=vision)
    docs = [doc for row in data.media for doc in row]
    assert len(data) == 1 and len(docs) == 2  # everything packed in one row; two documents have images
    for doc, example in zip(docs, [rows[0], rows[2]]):
        prompt = vision_chat_prompt(tok, example["messages"], vision.config, vision.image, vision.video,
                                    add_generation_prompt=False)
        np.testing.assert_array_equal(doc.ids, prompt.token_ids)
        text_only = [{**m, "content": " ".join(p["text"] for p in m["content"] if p.get("type") == "text")}
                     if isinstance(m["content"], list) else m for m in example["messages"]]
        ids, learn = tokenize_example({"messages": text_only}, tok)
        assert doc.ids[doc.learn].tolist() == ids[learn].tolist() and doc.learn.sum() > 0
        assert not doc.learn[doc.ids == vision.config.image_token_id].any()
    # the packed row: the documents' mRoPE positions in place, features numbered across the row
    index = data.rows["vision_index"][0]
    assert np.sum(index >= 0) == sum(int(np.sum(d.features >= 0)) for d in docs)
    np.testing.assert_array_equal(index[index >= 0], np.arange(np.sum(index >= 0)))
    np.testing.assert_array_equal(data.rows["positions"][0][:, :len(docs[0].ids)], docs[0].positions)


def hf_logits(hf, ids, doc=None) -> np.ndarray:
    """HF's float64-cast logits [n, vocab] of one document alone (with its images, when `doc`)."""
    ids_t = torch.as_tensor(np.asarray(ids, np.int64)[None])
    vision = {} if doc is None else {"pixel_values": torch.as_tensor(doc.pixel_values),
                                     "image_grid_thw": torch.as_tensor(doc.grids),
                                     "mm_token_type_ids": (ids_t == hf.config.image_token_id).int()}
    with torch.no_grad():
        return hf(input_ids=ids_t, **vision).logits[0].double().numpy()


def nll_sum(logits: np.ndarray, ids: np.ndarray, learn: np.ndarray) -> float:
    """Summed next-token NLL over the learned targets."""
    top = logits[:-1].max(-1)
    lse = top + np.log(np.exp(logits[:-1] - top[:, None]).sum(-1))
    return float(np.sum((lse - logits[np.arange(len(ids) - 1), ids[1:]]) * learn[1:]))


def test_trainer_loss_on_packed_vision_rows_equals_hf_per_document(checkpoint, data_file):
    """One packed row holds two documents with images and a text one between them. The training forward's
    logits on it equal HF's forward on each document alone (with its pixel_values and image_grid_thw), and the
    cross-entropy the trainer sums equals HF's over the learned tokens, float32."""
    hf, folder = checkpoint
    path, rows = data_file
    model = load_model(folder)
    tok = Tokenizer.load(folder)
    data = load_dataset(path, tok, seq_len=160, vision=vision_data(folder, model))
    assert len(data) == 1
    trainer = Trainer(model, TrainConfig(batch_size=1), vision=load_vision_tower(folder))
    params = trainer.init_state()["params"]
    batch = trainer.put_batch(data.gather(np.arange(1)))
    metrics = trainer.eval_step(params, batch)
    ours_model = trainer.model(params)
    hidden, _ = ours_model.train_hidden_states(batch["input_ids"], jnp.moveaxis(batch["positions"], 1, 0),
                                               batch["segment_ids"], embeds=vision_embeddings(ours_model, batch))
    ours_logits = np.asarray(ours_model.logits(hidden))[0]
    first, second = (doc for row in data.media for doc in row)
    text_ids, text_learn = tokenize_example(rows[1], tok)
    expected = count = 0.0
    start = 0
    for ids, learn, doc in [(first.ids, first.learn, first), (text_ids, text_learn, None),
                            (second.ids, second.learn, second)]:
        reference = hf_logits(hf, ids, doc)
        np.testing.assert_array_equal(np.asarray(batch["input_ids"])[0, start:start + len(ids)], ids)
        assert np.abs(ours_logits[start:start + len(ids)] - reference).max() <= 1e-4
        expected += nll_sum(reference, ids, learn)
        count += float(learn[1:].sum())
        start += len(ids)
    assert float(metrics["tokens"]) == count
    assert abs(float(metrics["ce_sum"]) - expected) <= 1e-5 * expected


def test_data_errors_name_the_line_and_input(checkpoint, tmp_path):
    _, folder = checkpoint
    tok, vision = Tokenizer.load(folder), vision_data(folder)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "image": str(tmp_path / "nope.png")}]},
        {"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"missing.jsonl:1: .*nope.png"):
        load_dataset(missing, tok, seq_len=64, vision=vision)
    with pytest.raises(DataError, match=r"missing.jsonl:1: the conversation has images or videos, but the model "
                                        "has no vision tower"):
        load_dataset(missing, tok, seq_len=64)
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "image": image_file(tmp_path, "b.png", 128, 128, 0)}]},
        {"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"big.jsonl:1: \d+ tokens with images or videos, longer than seq_len 16"):
        load_dataset(big, tok, seq_len=16, vision=vision)


def test_finetuning_trains_the_vision_tower_and_freezes_its_matched_blocks(checkpoint, data_file, tmp_path):
    """A fine-tuning run on the image conversations: the saved checkpoint holds the trained tower (it loads and
    serves), block 0 frozen by a `frozen` pattern over its HF names keeps its values, block 1 and the merger move."""
    from train.finetune import run
    _, folder = checkpoint
    path, _ = data_file
    tc = TrainConfig(model=str(folder), train_data=[str(path)], seq_len=80, batch_size=2, steps=2,
                     learning_rate=1e-2, warmup_steps=0, save_every=100, output_dir=str(tmp_path / "run"),
                     frozen=[r"model\.visual\.blocks\.0\."])
    summary = run(tc, progress=False)
    assert np.isfinite(summary["loss"])
    before = load_vision_tower(folder)
    after = load_vision_tower(summary["final"])
    qkv0, qkv1 = np.asarray(before.blocks.attn.qkv[...]), np.asarray(after.blocks.attn.qkv[...])
    np.testing.assert_array_equal(qkv1[0], qkv0[0])
    assert not np.array_equal(qkv1[1], qkv0[1])
    assert not np.array_equal(np.asarray(after.merger.fc2[...]), np.asarray(before.merger.fc2[...]))
    assert not np.array_equal(np.asarray(after.patch_embed[...]), np.asarray(before.patch_embed[...]))
    jax.block_until_ready(after.patch_embed[...])


def mtp_nll(model, encoder, ids, learn, doc=None) -> tuple[float, int]:
    """(summed NLL of the MTP's predictions of learned tokens i+2, their count) for one document alone, by the
    inference-side functions: the trunk over its multimodal embeddings at its mRoPE positions, then the MTP fed
    hidden state i and token i+1's input embedding (its vision feature at an image token)."""
    from qwen35_jax.vision.multimodal import (VisionPrompt, embed_multimodal, feature_index, gather_features,
                                              prompt_positions, vision_features)
    from qwen35_jax.vision.processing import ProcessedVision
    ids_j = jnp.asarray(np.asarray(ids, np.int32)[None])
    if doc is None:
        embeds, positions = model.embed(ids_j), jnp.arange(len(ids))[None]
    else:
        prompt = VisionPrompt(list(ids), ProcessedVision(doc.pixel_values, doc.grids))
        vcfg = model.config.vision
        rows, mask = gather_features(vision_features(encoder, prompt), feature_index(prompt, vcfg)[None])
        embeds = embed_multimodal(model, ids_j, jnp.asarray(rows), jnp.asarray(mask))
        positions = jnp.asarray(prompt_positions(prompt, vcfg)[0])[:, None, :]
    hidden = model.hidden_states(ids_j, positions=positions, embeds=embeds)
    logits = np.asarray(model.logits(model.mtp(hidden[:, :-1], embeds[:, 1:], positions=positions[..., :-1])),
                        np.float64)[0]
    top = logits.max(-1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(-1))
    nll = lse[:-1] - logits[np.arange(len(ids) - 2), ids[2:]]
    return float(np.sum(nll * learn[2:])), int(learn[2:].sum())


def test_mtp_loss_on_vision_rows_feeds_the_mtp_the_vision_features(checkpoint, data_file, tmp_path):
    """The checkpoint with an MTP block (random `mtp.*` tensors added) and mtp_loss_weight on: the MTP loss on the
    packed vision row (two documents with images, a text one) equals the mean over the documents run alone
    (`mtp_nll`), where an image token following position i enters the MTP as its vision feature, as in speculative
    decoding."""
    import shutil

    from qwen35_jax.hf_reference import add_mtp_tensors
    _, folder = checkpoint
    path, rows = data_file
    folder = shutil.copytree(folder, tmp_path / "mtp")
    add_mtp_tensors(folder, seed=2, std=0.2)
    model, tok = load_model(folder), Tokenizer.load(folder)
    data = load_dataset(path, tok, seq_len=160, vision=vision_data(folder, model))
    trainer = Trainer(model, TrainConfig(batch_size=1, mtp_loss_weight=0.5), vision=load_vision_tower(folder))
    params = trainer.init_state()["params"]
    _, metrics = jax.jit(trainer.grads)(params, trainer.put_batch(data.gather(np.arange(1))))
    ours, encoder = trainer.model(params), load_vision_tower(folder)
    first, second = (doc for row in data.media for doc in row)
    text_ids, text_learn = tokenize_example(rows[1], tok)
    parts = [mtp_nll(ours, encoder, d.ids, d.learn, d) for d in (first, second)]
    parts.append(mtp_nll(ours, encoder, text_ids, text_learn))
    total, count = map(sum, zip(*parts))
    assert int(metrics["mtp_tokens"]) == count
    assert abs(float(metrics["mtp_loss"]) - total / count) <= 1e-5 * total / count
