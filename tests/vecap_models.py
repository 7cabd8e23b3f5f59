"""Tiny random-weight models for the caption pipeline's tests, built offline (nothing downloaded).

`build_models(root)` writes two local HuggingFace directories:

* ROOT/captioner: a LLaVA-style model (CLIP vision tower + Llama text model, hidden sizes 16-32,
  one layer each) with a LlavaProcessor (CLIP image processor, 32 px);
* ROOT/lm: a Llama causal LM of the same size with its tokenizer.

Both tokenizers are word-level, trained on the spot on a small vocabulary of caption words with
the `tokenizers` library and wrapped as PreTrainedTokenizerFast with a chat template; a random
model then writes word soups ("red circle on the gray ...") that the rule checks can read. The
weights are drawn with a wide initializer so that the random models do not repeat one token.
Everything is seeded: the same directories, byte for byte, on every build.
"""

from __future__ import annotations

import os

WORDS = """
a an the of on in at with and to is are this that image photo picture caption visual alttext
red green blue yellow purple orange white black gray brown dark light small medium large big
circle square triangle diamond cross shape shapes object objects background plain top bottom left
right center middle corner next near above below one two three sky dog cat tree table road car
yes no Yes No safe harmful describe write sentence words concise short answer only keep names
""".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    " {% else %}ASSISTANT: {{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL, show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 2 + [".,:;!?\"'()-"], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _llama_config(vocab: int, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.5,
        tie_word_embeddings=False,
        **kw,
    )


def build_models(root: str, seed: int = 0) -> dict[str, str]:
    """Writes ROOT/captioner and ROOT/lm; returns {"captioner": dir, "lm": dir}."""
    import torch
    import transformers
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tok = _tokenizer()
    dirs = {"captioner": os.path.join(root, "captioner"), "lm": os.path.join(root, "lm")}

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=_llama_config(len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    llava = LlavaForConditionalGeneration(cfg).eval()
    llava.save_pretrained(dirs["captioner"])
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=8,
        image_token="<image>",
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(dirs["captioner"])

    torch.manual_seed(seed + 1)
    lm = LlamaForCausalLM(_llama_config(len(tok))).eval()
    lm.save_pretrained(dirs["lm"])
    tok.save_pretrained(dirs["lm"])
    return dirs
