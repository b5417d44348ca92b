#!/usr/bin/env python3
"""Builds the tiny BLIP-2 fixtures under tests/fixtures/ with HF transformers.

`blip2-tiny-t5-*` put a T5 encoder-decoder behind the Q-Former (the FlanT5 recipe,
gated-GELU and an untied head, at f32; classic T5's ReLU and tied, scaled head at bf16)
with a T5-style Unigram tokenizer (`</s>` appended); their goldens add the T5
encoder's output (`encoder_hidden`) and the first decoder step's logits.

A real `Blip2ForConditionalGeneration` (BLIP ViT with fused qkv -> Q-Former -> language
projection -> OPT) with random weights (std 0.1, norm weights 1 + 0.1*N), an OPT-style
byte-level BPE tokenizer (`</s>` as BOS), and `BlipImageProcessor` (PIL backend), saved
with `save_pretrained` and reloaded through `from_pretrained` for the goldens:

  golden.safetensors  pixel_values, vision_features (post_layernorm last hidden state),
                      qformer_output, projected (language_projection), logits (prefill)
  golden.json         prompt, image, input_ids, greedy ids and their logprobs

Run from the repository root with one torch thread:
    python tools/gen_blip2_fixtures.py [NAME ...]      # NAMEs: only those fixtures
"""
import json
import os
import sys

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BertTokenizerFast,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_llava_fixtures import CORPUS, IMAGES, ROOT, fresh, init_weights, write_golden  # noqa: E402

torch.set_num_threads(1)


def make_tokenizer():
    """OPT-style: byte-level BPE, `<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3, `</s>` prepended."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    # Blip2Processor adds `<image>` itself (as the hub's BLIP-2 tokenizers have it).
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


ONLY = set(sys.argv[1:])


def new_blip2(tokenizer, vision, qformer, text_config, num_query_tokens):
    """A Blip2Config with `text_config(vocab_size)` behind the Q-Former, and its PIL-backend
    processor (which adds `<image>` to the tokenizer first: the vocabulary counts it)."""
    size = vision["image_size"]
    ip = BlipImageProcessorPil(size={"height": size, "width": size})
    proc = Blip2Processor(image_processor=ip, tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    cfg = Blip2Config(
        vision_config=Blip2VisionConfig(**vision).to_dict(),
        qformer_config=Blip2QFormerConfig(encoder_hidden_size=vision["hidden_size"], **qformer).to_dict(),
        text_config=text_config(len(tokenizer)).to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return proc, cfg


def image_stages(ref, pixel_values):
    """The vision tower's features, the Q-Former's queries and their projection."""
    vis = ref.vision_model(pixel_values).last_hidden_state
    q = ref.qformer(query_embeds=ref.query_tokens, encoder_hidden_states=vis).last_hidden_state
    return vis, q, ref.language_projection(q)


def boost(model, factor):
    """Scales the language model's weights (its norms' aside): a livelier model."""
    with torch.no_grad():
        for n, p in model.language_model.named_parameters():
            if "norm" not in n:
                p.mul_(factor)


def build(name, *, vision, qformer, text, num_query_tokens, prompt, image, max_new_tokens=8):
    if ONLY and name not in ONLY:
        return
    out = fresh(name)
    tokenizer = make_tokenizer()
    def text_config(vocab_size):
        return OPTConfig(vocab_size=vocab_size, bos_token_id=2, eos_token_id=2, pad_token_id=1, **text)

    proc, cfg = new_blip2(tokenizer, vision, qformer, text_config, num_query_tokens)
    model = Blip2ForConditionalGeneration(cfg).eval()
    init_weights(model)
    # A livelier OPT: at std 0.1 its greedy output repeats one token, a weak golden.
    boost(model, 2.5)
    model.save_pretrained(out)
    proc.save_pretrained(out)

    ref = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    proc = Blip2Processor.from_pretrained(out, backend="pil")
    pil = Image.open(os.path.join(IMAGES, image))
    inputs = proc(images=pil, text=prompt, return_tensors="pt")
    golden = {}
    with torch.no_grad():
        golden["logits"] = ref(**inputs).logits[0]
        vis, q, projected = image_stages(ref, inputs["pixel_values"])
        golden["pixel_values"] = inputs["pixel_values"]
        golden["vision_features"] = vis[0]
        golden["qformer_output"] = q[0]
        golden["projected"] = projected[0]
        gen = ref.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    n_prompt = inputs["input_ids"].shape[1]
    seq = gen.sequences[0].tolist()
    # generate() returns only new tokens for BLIP-2 when given inputs_embeds-like inputs;
    # both forms are handled.
    ids = seq[n_prompt:] if len(seq) > len(gen.logits) else seq
    logprobs = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(gen.logits, ids)]
    write_golden(out, golden, {
        "prompt": prompt,
        "images": [image],
        "dtype": "float32",
        "prompt_token_ids": inputs["input_ids"][0].tolist(),
        "token_ids": ids,
        "logprobs": logprobs,
        "text": proc.tokenizer.decode(ids, skip_special_tokens=True),
        "max_new_tokens": max_new_tokens,
    })
    print(name, "prompt", n_prompt, "tokens; greedy", ids)


def make_t5_tokenizer():
    """T5-style: Unigram over metaspace pieces, `<pad>`=0 `</s>`=1 `<unk>`=2, `</s>` appended.
    The pieces are listed, not trained (the Unigram trainer's vocabulary varies from run
    to run): each corpus word whole, its first half, and single characters, scored so
    the longest pieces win."""
    words = sorted({w for line in CORPUS for w in line.split()})
    pieces = {}
    for w in words:
        pieces["\u2581" + w] = -2.0
        pieces["\u2581" + w[: (len(w) + 1) // 2]] = -6.0
        for c in w:
            pieces.setdefault(c, -9.0)
    pieces.setdefault("\u2581", -8.0)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + sorted(pieces.items())
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def build_t5(name, *, dtype, vision, qformer, text, num_query_tokens, prompt, image, max_new_tokens=8,
             language_boost=2.5, shared_scale=6.0):
    """BLIP-2 with a T5 language model: the query tokens and the prompt go through the T5
    encoder once; the decoder starts from `decoder_start_token_id` and cross-attends to it."""
    if ONLY and name not in ONLY:
        return
    out = fresh(name)
    tokenizer = make_t5_tokenizer()
    def text_config(vocab_size):
        return T5Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **text)

    proc, cfg = new_blip2(tokenizer, vision, qformer, text_config, num_query_tokens)
    model = Blip2ForConditionalGeneration(cfg).eval()
    init_weights(model)
    boost(model, language_boost)
    with torch.no_grad():
        if text["tie_word_embeddings"]:
            # The tied head sees the output times d_model^-0.5: a wider embedding keeps
            # its logits apart (near-equal ones make a greedy golden that rounding flips).
            model.language_model.shared.weight.mul_(shared_scale)
    model.to(dtype).save_pretrained(out)
    proc.save_pretrained(out)
    if not text["tie_word_embeddings"]:
        # FlanT5's layout: its own head (transformers 5 saves a T5 head tied to
        # `shared`, and loads a checkpoint's `lm_head.weight` untied when there is one).
        path = os.path.join(out, "model.safetensors")
        sd = load_file(path)
        g = torch.Generator().manual_seed(1)
        shared = sd["language_model.shared.weight"]
        sd["language_model.lm_head.weight"] = (0.25 * torch.randn(shared.shape, generator=g)).to(shared.dtype)
        save_file(sd, path, metadata={"format": "pt"})
        cfg_path = os.path.join(out, "config.json")
        c = json.load(open(cfg_path))
        c["text_config"]["tie_word_embeddings"] = False
        json.dump(c, open(cfg_path, "w"), indent=2)

    ref = Blip2ForConditionalGeneration.from_pretrained(out, dtype=dtype).eval()
    assert (ref.language_model.lm_head.weight.data_ptr() == ref.language_model.shared.weight.data_ptr()) == \
        text["tie_word_embeddings"], "the head is tied as configured"
    proc = Blip2Processor.from_pretrained(out, backend="pil")
    pil = Image.open(os.path.join(IMAGES, image))
    inputs = proc(images=pil, text=prompt, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    lm = ref.language_model
    golden = {}
    with torch.no_grad():
        vis, q, projected = image_stages(ref, inputs["pixel_values"])
        embeds = lm.get_input_embeddings()(inputs["input_ids"])
        mask = (inputs["input_ids"] == cfg.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, projected.to(embeds.dtype))
        enc = lm.get_encoder()(inputs_embeds=embeds).last_hidden_state
        start = torch.tensor([[cfg.text_config.decoder_start_token_id]])
        first = ref(**inputs, decoder_input_ids=start).logits[0]
        golden["pixel_values"] = inputs["pixel_values"].float()
        golden["vision_features"] = vis[0].float()
        golden["qformer_output"] = q[0].float()
        golden["projected"] = projected[0].float()
        golden["encoder_hidden"] = enc[0].float()
        golden["logits"] = first.float()
        gen = ref.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    seq = gen.sequences[0].tolist()
    # The decoder's sequence starts with decoder_start_token_id.
    ids = seq[1:] if seq and seq[0] == cfg.text_config.decoder_start_token_id else seq
    logprobs = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(gen.logits, ids)]
    write_golden(out, golden, {
        "prompt": prompt,
        "images": [image],
        "dtype": str(dtype).replace("torch.", ""),
        "prompt_token_ids": inputs["input_ids"][0].tolist(),
        "decoder_start_token_id": cfg.text_config.decoder_start_token_id,
        "token_ids": ids,
        "logprobs": logprobs,
        "text": proc.tokenizer.decode(ids, skip_special_tokens=True),
        "max_new_tokens": max_new_tokens,
    })
    print(name, "prompt", inputs["input_ids"].shape[1], "tokens; greedy", ids)


def make_bert_tokenizer():
    """BERT-style uncased WordPiece with [CLS] ... [SEP], as BLIP-2 retrieval uses."""
    from tokenizers import normalizers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]")


def build_retrieval(name, *, vision, qformer, num_query_tokens, pairs):
    """Blip2ForImageTextRetrieval: ITC (max over queries of normalised projections) and
    ITM (queries + text through the Q-Former, itm_head, mean over queries)."""
    if ONLY and name not in ONLY:
        return
    out = fresh(name)
    tokenizer = make_bert_tokenizer()
    size = vision["image_size"]
    proc = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": size, "width": size}),
                          tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    cfg = Blip2Config(
        vision_config=Blip2VisionConfig(**vision).to_dict(),
        qformer_config=Blip2QFormerConfig(encoder_hidden_size=vision["hidden_size"], vocab_size=len(tokenizer),
                                          max_position_embeddings=64, use_qformer_text_input=True,
                                          pad_token_id=0, **qformer).to_dict(),
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=24,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForImageTextRetrieval(cfg).eval()
    init_weights(model)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    ref = Blip2ForImageTextRetrieval.from_pretrained(out).eval()
    proc = Blip2Processor.from_pretrained(out, backend="pil")
    golden, cases = {}, []
    for i, (image, text) in enumerate(pairs):
        inputs = proc(images=Image.open(os.path.join(IMAGES, image)), text=text, return_tensors="pt")
        with torch.no_grad():
            itm = ref(**inputs, use_image_text_matching_head=True)
            itc = ref(**inputs, use_image_text_matching_head=False)
        golden[f"image_embeds_{i}"] = itc.image_embeds[0]
        golden[f"text_embeds_{i}"] = itc.text_embeds[0]
        cases.append({
            "image": image,
            "text": text,
            "input_ids": inputs["input_ids"][0].tolist(),
            "itm_logits": itm.logits_per_image[0].tolist(),
            "itm_probability": torch.softmax(itm.logits_per_image[0], -1)[1].item(),
            "itc_similarity": itc.logits_per_image[0].item(),
        })
    write_golden(out, golden, {"cases": cases})
    print(name, [(c["itm_probability"], c["itc_similarity"]) for c in cases])


def main():
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8, qkv_bias=True)
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   cross_attention_frequency=2)
    text = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, word_embed_proj_dim=64)
    build("blip2-tiny-opt-f32", vision=vision, qformer=qformer, text=text, num_query_tokens=8,
          prompt="Question: what is in the picture? Answer:", image="scene.png")
    # T5 behind the Q-Former: few relative-position buckets and a short max distance, so
    # a 30-token encoder input reaches the logarithmic buckets.
    t5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=20)
    build_t5("blip2-tiny-t5-f32", dtype=torch.float32, vision=vision, qformer=qformer,
             text=dict(t5, feed_forward_proj="gated-gelu", tie_word_embeddings=False), num_query_tokens=8,
             prompt="Question: what is in the picture? Answer:", image="scene.png")
    build_t5("blip2-tiny-t5-bf16", dtype=torch.bfloat16, vision=vision, qformer=qformer,
             text=dict(t5, feed_forward_proj="relu", tie_word_embeddings=True, num_layers=3, num_decoder_layers=3),
             num_query_tokens=8, prompt="Describe the image in detail.", image="tall.jpg",
             # Unboosted: with the f32 fixture's x2.5 this ReLU model is chaotic in bf16
             # (HF's own eager and SDPA attention disagree by 15% on its logits).
             language_boost=1.0, shared_scale=8.0)
    build_retrieval("blip2-tiny-retrieval-f32", vision=vision, qformer=qformer, num_query_tokens=8,
                    pairs=[("scene.png", "a red circle on a blue field"), ("tall.jpg", "a cat sitting next to a window")])


if __name__ == "__main__":
    sys.exit(main())
