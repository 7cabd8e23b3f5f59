"""The models of the caption pipeline, loaded once per Ray actor from local HuggingFace directories.

* `Captioner`: a LLaVA-style vision-language model through transformers' AutoProcessor and
  AutoModelForImageTextToText; one greedy caption per image.
* `TextModel`: an LLM through AutoTokenizer and AutoModelForCausalLM; greedy completions (the
  fusion step) and a yes/no answer (the check).

Greedy decoding everywhere (do_sample=False, one beam), so a rerun writes the same captions; the
pipeline also hands each model the same mini-batches on every run (pipeline.py), because a batched
model's numbers can depend on what else is in the batch (padding, kernel choice).

Backends. "transformers" works everywhere (fp32 on a CPU, bf16 on a GPU). "vllm" is used when
vLLM is importable and a GPU is present ("auto"), or when asked; it is an optional extra, not in
requirements.txt: it pins its own CUDA build of torch. The check reads its answer the same way on
both: one greedy token restricted to the yes and no tokens (checks.YES_ANSWERS / NO_ANSWERS).
Models are read from local directories only (`local_files_only`): nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
from collections.abc import Sequence
from typing import Any

from veclip_jax.errors import UserError
from veclip_jax.vecap import checks


class ModelError(UserError):
    """A model directory that cannot be loaded as the step needs: exit 2, naming it."""


@dataclasses.dataclass(frozen=True)
class Generated:
    """Texts generated for a batch, with the number of tokens each took (for the cost figures)."""

    texts: list[str]
    tokens: list[int]
    prompt_tokens: list[int]


def _torch_device(num_gpus: float) -> tuple[Any, Any]:
    import torch

    if num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def pick_backend(backend: str, num_gpus: float) -> str:
    """The backend to use: "transformers", or "vllm" when importable on a GPU ("auto") or asked for."""
    if backend == "transformers":
        return backend
    has_vllm = importlib.util.find_spec("vllm") is not None
    if backend == "vllm":
        if not has_vllm:
            raise UserError("--backend=vllm: vllm is not installed (pip install vllm, on a GPU host)")
        return backend
    if backend != "auto":
        raise UserError(f"--backend must be auto, transformers or vllm, got {backend!r}")
    if has_vllm and num_gpus > 0:
        import torch

        if torch.cuda.is_available():
            return "vllm"
    return "transformers"


def _vllm_memory(num_gpus: float) -> float:
    """vLLM's share of the GPU: it takes 90 % by default, so actors sharing a GPU (--num_gpus=0.5)
    must each ask for their fraction of it, or the second one finds no memory."""
    return round(0.9 * min(num_gpus, 1.0), 3) or 0.9


def _check_dir(path: str, what: str) -> str:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"{what} {path} is not a local HuggingFace model directory (no config.json)")
    return path


def _set_threads(num_cpus: float) -> None:
    import torch

    # An actor given a fraction of the CPUs must not spin up a thread per core: actors and read
    # tasks share the cores, and oversubscribed torch threads slow every one of them.
    torch.set_num_threads(max(1, int(round(num_cpus))))


def generation_settings(backend: str) -> dict[str, Any]:
    """The engine of a caption (backend, library versions), written into its provenance row."""
    import transformers

    settings = {"backend": backend, "transformers": transformers.__version__}
    if backend == "vllm":
        import vllm

        settings["vllm"] = vllm.__version__
    else:
        import torch

        settings["torch"] = torch.__version__
    return settings


def preflight(captioner: str, text_models: Sequence[tuple[str, str]]) -> None:
    """Checks in the driver, without loading weights, that each directory is the kind of model its
    step needs (ModelError naming the flag otherwise): an actor failing later fails far from the user.

    `text_models`: (flag, directory) of the LLMs (the fuser, the checker).
    """
    import transformers

    transformers.utils.logging.set_verbosity_error()

    def config(flag: str, path: str) -> Any:
        try:
            return transformers.AutoConfig.from_pretrained(_check_dir(path, flag), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{flag} {path}: its config.json cannot be read ({e})") from None

    cfg = config("--captioner", captioner)
    if type(cfg) not in transformers.AutoModelForImageTextToText._model_mapping:
        raise ModelError(f"--captioner {captioner}: a {cfg.model_type} model, not an image-text-to-text one")
    try:
        processor = transformers.AutoProcessor.from_pretrained(captioner, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"--captioner {captioner}: no image-text processor ({e})") from None
    if not hasattr(processor, "image_processor"):
        raise ModelError(f"--captioner {captioner}: its processor reads no images")
    for flag, path in text_models:
        cfg = config(flag, path)
        if type(cfg) not in transformers.AutoModelForCausalLM._model_mapping:
            raise ModelError(f"{flag} {path}: a {cfg.model_type} model, not a causal language model")
        try:
            transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{flag} {path}: no tokenizer ({e})") from None


def decode_image(data: bytes) -> Any:
    """The image as an RGB PIL image, or None when it does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except Exception:  # noqa: BLE001 (any decoder failure is a bad image, counted; never a crash)
        return None


class Captioner:
    """A vision-language model writing one caption per image with `prompt` (greedy)."""

    def __init__(
        self,
        model_dir: str,
        prompt: str,
        *,
        max_new_tokens: int,
        num_gpus: float = 0,
        num_cpus: float = 1,
        backend: str = "auto",
    ):
        self.backend = pick_backend(backend, num_gpus)
        self.max_new_tokens = max_new_tokens
        model_dir = _check_dir(model_dir, "--captioner")
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"--captioner {model_dir}: no image-text processor ({e})") from None
        self.prompt = self._chat(prompt)
        if self.backend == "vllm":
            import vllm

            self.llm = vllm.LLM(model=model_dir, seed=0, gpu_memory_utilization=_vllm_memory(num_gpus))
            self.params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
            return
        _set_threads(num_cpus)
        self.device, dtype = _torch_device(num_gpus)
        try:
            self.model = transformers.AutoModelForImageTextToText.from_pretrained(
                model_dir, local_files_only=True, dtype=dtype
            )
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"--captioner {model_dir}: not an image-text-to-text model ({e})") from None
        self.model.to(self.device).eval()
        tok = self.processor.tokenizer
        tok.padding_side = "left"  # generation continues each row at its end
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.config = transformers.GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tok.pad_token_id,
            eos_token_id=self.model.generation_config.eos_token_id,
        )

    def _chat(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        token = getattr(self.processor, "image_token", "<image>")
        return f"{token}\n{prompt}"

    def __call__(self, images: Sequence[Any]) -> Generated:
        """Captions of RGB PIL images, in order."""
        if not images:
            return Generated([], [], [])
        if self.backend == "vllm":
            outs = self.llm.generate(
                [{"prompt": self.prompt, "multi_modal_data": {"image": im}} for im in images],
                self.params,
                use_tqdm=False,
            )
            return Generated(
                [o.outputs[0].text for o in outs],
                [len(o.outputs[0].token_ids) for o in outs],
                [len(o.prompt_token_ids) for o in outs],
            )
        import torch

        inputs = self.processor(
            images=list(images), text=[self.prompt] * len(images), return_tensors="pt", padding=True
        ).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, generation_config=self.config)
        return _decoded(self.processor.tokenizer, out, inputs["input_ids"], inputs["attention_mask"])


def _decoded(tokenizer: Any, out: Any, input_ids: Any, attention_mask: Any) -> Generated:
    new = out[:, input_ids.shape[1] :]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    lengths = []
    for row in new.tolist():
        n = 0
        for t in row:
            n += 1
            if t == eos:
                break
        while n and row[n - 1] == pad and pad != eos:
            n -= 1
        lengths.append(n)
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return Generated(texts, lengths, attention_mask.sum(dim=1).tolist())


class TextModel:
    """An LLM: greedy completions of prompts (fusion) and yes/no answers (the check)."""

    def __init__(
        self,
        model_dir: str,
        *,
        max_new_tokens: int,
        num_gpus: float = 0,
        num_cpus: float = 1,
        backend: str = "auto",
        what: str = "--fuser",
    ):
        self.backend = pick_backend(backend, num_gpus)
        self.max_new_tokens = max_new_tokens
        model_dir = _check_dir(model_dir, what)
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{what} {model_dir}: no tokenizer ({e})") from None
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.yes_ids, self.no_ids = self._answer_ids(model_dir, what)
        if self.backend == "vllm":
            import vllm

            self.llm = vllm.LLM(model=model_dir, seed=0, gpu_memory_utilization=_vllm_memory(num_gpus))
            self.params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
            self.answer = vllm.SamplingParams(
                temperature=0.0, max_tokens=1, allowed_token_ids=self.yes_ids + self.no_ids
            )
            return
        _set_threads(num_cpus)
        self.device, dtype = _torch_device(num_gpus)
        try:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                model_dir, local_files_only=True, dtype=dtype
            )
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{what} {model_dir}: not a causal language model ({e})") from None
        self.model.to(self.device).eval()
        self.config = transformers.GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.model.generation_config.eos_token_id,
        )

    def _answer_ids(self, model_dir: str, what: str) -> tuple[list[int], list[int]]:
        def first(words: Sequence[str]) -> set[int]:
            ids = set()
            for w in words:
                enc = self.tokenizer.encode(w, add_special_tokens=False)
                if enc:
                    ids.add(enc[0])
            return ids

        yes, no = first(checks.YES_ANSWERS), first(checks.NO_ANSWERS)
        yes, no = yes - no, no - yes  # a token starting both answers tells nothing
        if not yes or not no:
            raise ModelError(f"{what} {model_dir}: its tokenizer cannot tell 'yes' from 'no' (the check)")
        return sorted(yes), sorted(no)

    def chat(self, prompt: str) -> str:
        """The prompt as the model's chat template frames a user turn (as it is without a template)."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
        return prompt

    def _encode(self, framed: list[str]) -> Any:
        # A chat template writes the special tokens itself; a bare prompt gets the tokenizer's own.
        plain = not getattr(self.tokenizer, "chat_template", None)
        inputs = self.tokenizer(framed, return_tensors="pt", padding=True, add_special_tokens=plain)
        return inputs.to(self.device)

    def complete(self, prompts: Sequence[str]) -> Generated:
        """Greedy completions of `prompts` (chat-framed), in order."""
        if not prompts:
            return Generated([], [], [])
        framed = [self.chat(p) for p in prompts]
        if self.backend == "vllm":
            outs = self.llm.generate(framed, self.params, use_tqdm=False)
            return Generated(
                [o.outputs[0].text for o in outs],
                [len(o.outputs[0].token_ids) for o in outs],
                [len(o.prompt_token_ids) for o in outs],
            )
        import torch

        inputs = self._encode(framed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, generation_config=self.config)
        return _decoded(self.tokenizer, out, inputs["input_ids"], inputs["attention_mask"])

    def answers_yes(self, prompts: Sequence[str]) -> list[bool]:
        """Each prompt's answer, one greedy token among the yes and no tokens: True for yes."""
        if not prompts:
            return []
        if self.backend == "vllm":
            outs = self.llm.generate([self.chat(p) for p in prompts], self.answer, use_tqdm=False)
            return [o.outputs[0].token_ids[0] in self.yes_ids for o in outs]
        return [checks.verdict(s) for s in self.answer_scores(prompts)]

    def answer_scores(self, prompts: Sequence[str]) -> list[dict[str, float]]:
        """{"yes": best yes-token logit, "no": best no-token logit} after each prompt (transformers)."""
        import torch

        inputs = self._encode([self.chat(p) for p in prompts])
        # Positions counted from each row's first real token, as generate() does: a left-padded row
        # must see the numbers it would see alone, whatever else is in the batch.
        positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(**inputs, position_ids=positions).logits[:, -1].float()
        yes = logits[:, self.yes_ids].max(dim=1).values.tolist()
        no = logits[:, self.no_ids].max(dim=1).values.tolist()
        return [{"yes": y, "no": n} for y, n in zip(yes, no, strict=True)]
