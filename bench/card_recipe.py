"""The model card's plain transformers recipe: the baseline every speed and fidelity claim is measured against.

One item at a time, `processor(...)` then `model.generate(...)`, with the speech and vision LoRA loaded
through peft and switched per prompt (not merged), exactly as the card loads them (adapted to the native
transformers classes, see ../shared/design/NOTES-phi4mm.md). Greedy decoding.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class CardOutput:
    token_ids: list[int]
    text: str
    logits: list[torch.Tensor] | None = None  # raw logits per generated step (when asked)


class CardRecipe:
    def __init__(self, model_dir: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 model=None):
        from transformers import AutoModelForCausalLM

        from pipeline.model.inputs import load_processor

        self.processor = load_processor(model_dir)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model = model.to(device).eval()
        self.model_dir = model_dir
        self.loaded: set[str] = set()
        self.device = device
        self.dtype = dtype
        self.bad_words_ids = [[self.processor.image_token_id], [self.processor.audio_token_id]]

    def _use_adapter(self, name: str | None) -> None:
        """The card loads both LoRAs with peft and switches per prompt; loaded on first use here."""
        if name is None:
            if self.loaded:
                self.model.disable_adapters()  # text-only prompts run on the base weights
            return
        if name not in self.loaded:
            self.model.load_adapter(os.path.join(self.model_dir, f"{name}-lora"), adapter_name=name)
            self.loaded.add(name)
        self.model.enable_adapters()
        self.model.set_adapter(name)

    def _prompt(self, instruction: str, media: str | None) -> str:
        from pipeline.model.prompts import chat_messages

        return self.processor.apply_chat_template(chat_messages(instruction, media), add_generation_prompt=True,
                                                  tokenize=False)

    @torch.inference_mode()
    def _generate(self, inputs, max_new_tokens: int, min_new_tokens: int, want_logits: bool) -> CardOutput:
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                  do_sample=False, bad_words_ids=self.bad_words_ids,
                                  output_logits=want_logits, return_dict_in_generate=True)
        ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        kept = []
        for t in ids:
            if t in eos:
                break
            kept.append(t)
        text = self.processor.tokenizer.decode(kept, skip_special_tokens=True).strip()
        logits = [step[0].float().cpu() for step in out.logits] if want_logits else None
        return CardOutput(kept, text, logits)

    def audio(self, audio: np.ndarray, instruction: str, max_new_tokens: int, min_new_tokens: int = 0,
              want_logits: bool = False) -> CardOutput:
        self._use_adapter("speech")
        inputs = self.processor(text=self._prompt(instruction, "audio"), audio=[audio], sampling_rate=16000,
                                return_tensors="pt")
        return self._generate(inputs, max_new_tokens, min_new_tokens, want_logits)

    def image(self, image, instruction: str, max_new_tokens: int, min_new_tokens: int = 0,
              want_logits: bool = False, dynamic_hd: int | None = None) -> CardOutput:
        self._use_adapter("vision")
        kwargs = {"dynamic_hd": dynamic_hd} if dynamic_hd else {}
        inputs = self.processor(text=self._prompt(instruction, "image"), images=[image], return_tensors="pt",
                                **kwargs)
        return self._generate(inputs, max_new_tokens, min_new_tokens, want_logits)

    def text(self, instruction: str, max_new_tokens: int, min_new_tokens: int = 0,
             want_logits: bool = False) -> CardOutput:
        self._use_adapter(None)
        inputs = self.processor(text=self._prompt(instruction, None), return_tensors="pt")
        return self._generate(inputs, max_new_tokens, min_new_tokens, want_logits)

    def text_ids(self, input_ids: list[int], max_new_tokens: int, min_new_tokens: int = 0,
                 want_logits: bool = False) -> CardOutput:
        """A text prompt given as its token ids (a summary prompt holding a transcript's generated ids)."""
        self._use_adapter(None)
        return self._generate({"input_ids": torch.tensor([input_ids])}, max_new_tokens, min_new_tokens, want_logits)

    def prompt(self, images: list, audios: list[np.ndarray], instruction: str | None, max_new_tokens: int,
               system_prompt: str | None = None, min_new_tokens: int = 0, want_logits: bool = False,
               dynamic_hd: int | None = None) -> CardOutput:
        """Any mix, as the card prompts it (images, then audios, then the text; no text: a spoken
        query), with the card's adapter for the mix: vision for any image, speech for audio only."""
        from pipeline.model.prompts import prompt_messages

        self._use_adapter("vision" if images else "speech" if audios else None)
        text = self.processor.apply_chat_template(prompt_messages(len(images), len(audios), instruction,
                                                                  system_prompt),
                                                  add_generation_prompt=True, tokenize=False)
        kwargs: dict = {}
        if images:
            kwargs["images"] = list(images)
            if dynamic_hd:
                kwargs["dynamic_hd"] = dynamic_hd
        if audios:
            kwargs.update(audio=list(audios), sampling_rate=16000)
        inputs = self.processor(text=text, return_tensors="pt", **kwargs)
        return self._generate(inputs, max_new_tokens, min_new_tokens, want_logits)
