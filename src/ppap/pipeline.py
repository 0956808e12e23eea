"""``PPAPPipeline``: a diffusers pipeline that samples any pixel-space diffusers UNet with
plug-and-play guidance by an off-the-shelf model (Go et al., CVPR 2023).

It holds the ``unet`` and the ``scheduler`` as registered modules (so ``from_pretrained``,
``save_pretrained`` and ``.to(device)`` work as in diffusers) and takes the guidance at call time,
as diffusers' community guided pipelines take their operator: a guide is not a saved component.
The sampling maths lives in ``ppap.samplers``; this module only wires arguments, devices, noise
and outputs.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from .banks import ExpertBank, as_guide_model
from .config import EXPERT_METHODS, PARTICLE_EXPERT_METHODS, PARTICLE_METHODS, default_scale
from .diffusion import Conditioning, Diffusion, NoiseSchedule, build_conditioning
from .frozen import check_device, snapshot_modes
from .guidance import Calibration, GuidanceTerm, compose
from .io import PPAPError, give_usual_permissions
from .particles import SMCResult, sample_particle_term
from .samplers import NonFiniteError, Progress
from .schedulers import sample, sampling_scheduler
from .tasks import Classification, class_targets, dense_targets, output_shape, task_for

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# diffusers' custom-pipeline entry point, written into every saved folder: with it,
# ``DiffusionPipeline.from_pretrained(folder, custom_pipeline="ppap_pipeline", trust_remote_code=True)``
# gives a PPAPPipeline. It only imports the installed ppap package (diffusers checks that it is there).
CUSTOM_PIPELINE_FILE = "ppap_pipeline.py"
CUSTOM_PIPELINE_CODE = '''"""diffusers' custom-pipeline entry point of a ppap pipeline folder: the class is the installed
ppap package's own (pip install ppap). Load with
DiffusionPipeline.from_pretrained(folder, custom_pipeline="ppap_pipeline", trust_remote_code=True)."""

from ppap.pipeline import PPAPPipeline

__all__ = ["PPAPPipeline"]
'''


@dataclass
class ParticlePipelineOutput(ImagePipelineOutput):
    """The images of a particle method, and its run (weights, ESS per step, resampling steps)."""

    diagnostics: SMCResult | None = None


class PPAPPipeline(DiffusionPipeline):
    r"""Guided sampling of a pixel-space diffusers UNet (``UNet2DModel`` or ``UNet2DConditionModel``).

    Parameters:
        unet: the denoiser; any prediction type (``epsilon`` / ``v_prediction`` / ``sample``, as the
            scheduler config says), learned variance (2C output channels) included.
        scheduler: the diffusers scheduler sampled with by default (its config gives the noise
            schedule, the timestep spacing, ``steps_offset``, ``set_alpha_to_one``, clipping and
            variance): ``DDPMScheduler``, ``DDIMScheduler``, ``DPMSolverMultistepScheduler``,
            ``UniPCMultistepScheduler``, ``EulerDiscreteScheduler``,
            ``EulerAncestralDiscreteScheduler`` or ``HeunDiscreteScheduler``.
        text_encoder, tokenizer: optional, for a text-conditional UNet: a transformers text model
            whose last hidden states are the UNet's ``encoder_hidden_states``, and its tokenizer
            (``prompt=`` is encoded with them, see ``encode_prompt``).

    Devices: the pipeline samples on its execution device (``pipe.to(device)``, or the
    accelerator that ``enable_model_cpu_offload`` and accelerate's offload hooks name). The guide
    and the expert bank passed at call time are used where they are, as diffusers uses what a
    caller passes: move them to that device first (``guide.to("cuda")``); a guide elsewhere is a
    one-line error naming both devices. A call hands them back as it found them: on their device,
    in their train/eval mode, with their ``requires_grad`` (guidance runs them frozen, in eval
    mode, for the call only).

    Default guidance scales, per task and method (``DEFAULT_SCALES``, the scales the zoo
    benchmarks chose in docs/results.md; an expert bank's own recorded ``default_scale`` comes
    first for the expert methods):

    * classification: naive 30, ppap 30, noise-aware 30, multi-expert-supervised 10, x0 1, x0-shortcut 1,
      best-of-n 1, fk 3, tds 3, ppap-smc 20, ppap-fk 20 (for the particle methods, the exponent lambda of p(y|x)^lambda);
    * segmentation: naive 300, ppap 1000, x0 300;
    * dense: naive 3000, ppap 10000, x0 10000;

    and, not swept, PPAP's scale for the supervised banks and x0's for x0-shortcut.

    Example:
        ```py
        >>> from ppap import PPAPPipeline
        >>> from ppap.loading import load_guide
        >>> pipe = PPAPPipeline.from_pretrained("./my-ddpm").to("cuda")
        >>> out = pipe(batch_size=16, num_inference_steps=25, guide=load_guide("fashion-classifier").to("cuda"),
        ...            experts="./experts", target="sneaker", generator=torch.manual_seed(0))
        >>> out.images[0].save("sneaker.png")
        ```
    """

    model_cpu_offload_seq = "text_encoder->unet"
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents", "x0", "guidance"]  # what ``callback_on_step_end`` can be given

    def __init__(self, unet: nn.Module, scheduler: SchedulerMixin, text_encoder: nn.Module | None = None, tokenizer: Any = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    @property
    def diffusion(self) -> Diffusion:
        """The UNet and the scheduler's schedule behind one ``(x_t, t, cond) -> Prediction`` call:
        one object while ``unet``, ``scheduler`` (and its config) and the name stay the same, a
        new one after either is replaced."""
        key = (self.unet, self.scheduler, dict(self.scheduler.config), str(self.name_or_path or "in-memory"))
        cached = self.__dict__.get("_diffusion")
        if cached is None or not (cached[0][0] is key[0] and cached[0][1] is key[1] and cached[0][2:] == key[2:]):
            cached = (key, Diffusion(self.unet, NoiseSchedule.from_diffusers(self.scheduler), name=key[3]))
            self._diffusion = cached
        return cached[1]

    @property
    def num_timesteps(self) -> int:
        """Steps of the current (or last) call: diffusers' ``PipelineCallback`` cut-offs read it."""
        return getattr(self, "_num_timesteps", 0)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.diffusion.image_shape

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """diffusers' ``save_pretrained``, with its weight files readable as any file ``open()``
        writes (safetensors' ``save_file`` leaves them 0600), and ``ppap_pipeline.py``, the
        folder's custom-pipeline entry point for diffusers' own ``DiffusionPipeline.from_pretrained``."""
        start = time.time() - 1.0  # file times may be coarser than time.time()
        super().save_pretrained(save_directory, **kwargs)
        (Path(save_directory) / CUSTOM_PIPELINE_FILE).write_text(CUSTOM_PIPELINE_CODE)
        give_usual_permissions(Path(save_directory), written_since=start)

    # ---- guidance and conditions, resolved for a whole run -------------------------------------

    def encode_prompt(
        self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, do_classifier_free_guidance: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``(prompt_embeds [P, L, D], negative_prompt_embeds [P, L, D] or None)`` of P prompts,
        by the pipeline's ``text_encoder`` on ``tokenizer``'s ids (as diffusers' pipelines encode
        them); the negative ones only with classifier-free guidance, of ``negative_prompt``, else
        of the empty prompt."""
        from .text import encode_prompts

        if self.text_encoder is None or self.tokenizer is None:
            raise PPAPError("a prompt needs the pipeline's text_encoder and tokenizer, and this pipeline has none: pass prompt_embeds")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds = encode_prompts(self.tokenizer, self.text_encoder, prompts)
        if not do_classifier_free_guidance:
            return embeds, None
        negative = "" if negative_prompt is None else negative_prompt
        negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negatives) != len(prompts):
            raise PPAPError(f"{len(negatives)} negative prompts for {len(prompts)} prompts (give one, or one per prompt)")
        return embeds, encode_prompts(self.tokenizer, self.text_encoder, negatives)

    def guidance_term(
        self,
        num: int,
        *,
        guide: nn.Module | str | os.PathLike | None = None,
        experts: ExpertBank | str | os.PathLike | None = None,
        target: Any = None,
        target_image: Tensor | None = None,
        method: str | None = None,
        classifier_scale: float | None = None,
        calibration: Calibration | None = None,
        task: str | None = None,
    ) -> GuidanceTerm | None:
        """One guidance term with ``num`` per-sample targets (None when nothing guides).

        ``guide`` is the off-the-shelf model (a ``GuideModel``, an ``nn.Module`` taking the
        diffusion model's images in [-1, 1], or a reference ``load_guide`` takes); ``experts`` a bank, or
        its folder, zoo name or hub id (then loaded on a copy of the guide, which stays untouched); a bank given without ``guide`` brings its own
        (``bank.guide``) to the expert methods. ``target`` class index / name / list (cycled),
        ``'all'``, or a label / dense map tensor; ``target_image`` reference images [C, H, W] or
        [N, C, H, W] in [-1, 1] whose clean-model output is the dense target; ``method`` defaults to
        ``ppap`` with experts, ``naive`` with only a guide. ``classifier_scale`` defaults to the
        bank's recorded scale (expert methods), else ``default_scale(task, method)``."""
        method = method or ("ppap" if experts is not None else "naive" if guide is not None else "unguided")
        if method == "unguided":
            return None
        if isinstance(guide, (str, os.PathLike)):  # as ``experts``: a folder, a zoo name or a hub id, loaded here
            from .loading import load_guide

            guide = load_guide(os.fspath(guide)).to(self._execution_device)
        elif guide is not None and not isinstance(guide, nn.Module):
            raise PPAPError(f"guide must be an nn.Module, a folder, a zoo name or a hub id, got {type(guide).__name__}")
        if guide is None and isinstance(experts, ExpertBank) and method in EXPERT_METHODS + PARTICLE_EXPERT_METHODS:
            guide = experts.guide  # the bank's own guide: its class names, reference and shapes
        if guide is None:
            raise PPAPError(f"method {method!r} needs a guide (the off-the-shelf model)")
        guide = as_guide_model(guide)
        diffusion = self.diffusion
        bank: ExpertBank | None = None
        if isinstance(experts, ExpertBank):
            bank = experts
        elif experts is not None:
            bank = ExpertBank.from_pretrained(copy.deepcopy(guide), experts, schedule=diffusion.schedule)  # a folder, zoo name or hub id
        if bank is not None:
            if bank.task is None:
                raise PPAPError("the expert bank has no task: load it with ppap.load_bank or train it with train_experts")
            the_task = bank.task
            clean = bank.teacher  # the bank's adapters live in its own net: targets use the frozen model
            # experts for another image shape or another output fail here, in one line, not mid-sampling
            shape = output_shape(bank.guide, diffusion.image_shape)
            the_task.check_target(the_task.target_from_output(torch.zeros(shape)), shape)
        else:
            the_task = task_for(guide, diffusion.image_shape, task or guide.task or "classification")
            clean = guide
        if method in PARTICLE_METHODS and not isinstance(the_task, Classification):
            raise PPAPError(f"method {method!r} takes a classifier guide (classification), not {the_task.name}")
        if isinstance(the_task, Classification):
            if target_image is not None or (isinstance(target, Tensor) and target.ndim > 1):
                raise PPAPError("reference images and target maps are for segmentation or dense guides; a classifier takes --target CLASS")
            targets = class_targets(0 if target is None else target, num, the_task.num_classes, guide.classes)
        else:
            if target is not None and not isinstance(target, (Tensor, np.ndarray)):
                raise PPAPError(f"a {the_task.name} guide takes a target map or a reference image, not {target!r}")
            image = None if target_image is None else target_image.to(next(iter(guide.parameters())).device)
            targets = dense_targets(
                the_task,
                clean,
                num,
                output_shape(bank.guide if bank is not None else clean, diffusion.image_shape),
                image=image,
                target_map=None if target is None else torch.as_tensor(target),
            )
        if classifier_scale is None and method in EXPERT_METHODS:
            classifier_scale = getattr(bank, "default_scale", None)
        scale = float(default_scale(the_task.name, method) if classifier_scale is None else classifier_scale)
        return GuidanceTerm(
            method,
            the_task,
            targets,
            scale,
            net=guide,
            experts=bank,
            calibration=calibration or Calibration(),
            description=f"{method} {guide.ref} ({the_task.name}) x{scale:g}",
        )

    def conditioning(
        self,
        num: int,
        *,
        class_labels=None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_class_labels=None,
        guidance_scale: float = 1.0,
    ) -> Conditioning | None:
        """The UNet's conditions for ``num`` samples: labels cycled, a single prompt embedding repeated."""
        return build_conditioning(
            num,
            getattr(self.unet.config, "num_class_embeds", None),
            class_labels=class_labels,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_class_labels=negative_class_labels,
            guidance_scale=guidance_scale,
        )

    # ---- sampling ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _step_progress(self, enabled: bool, total: int) -> Iterator[Progress]:
        """The samplers' step bar: diffusers' ``progress_bar`` (so ``set_progress_bar_config``
        applies), closed on the way out, an error's included, so that the error is the last line."""
        if not enabled:
            yield False
            return
        bar = self.progress_bar(total=total)

        def steps(timesteps: list[int]) -> Iterator[int]:
            for t in timesteps:
                yield t
                bar.update()

        try:
            yield steps
        finally:
            bar.close()

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[PPAPPipeline, int, int, dict], dict | None]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        guide: nn.Module | str | os.PathLike | None = None,
        experts: ExpertBank | str | os.PathLike | None = None,
        target: Any = None,
        target_image: Tensor | None = None,
        method: str | None = None,
        classifier_scale: float | None = None,
        calibration: Calibration | None = None,
        task: str | None = None,
        terms: Sequence[GuidanceTerm] = (),
        class_labels=None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_class_labels=None,
        guidance_scale: float = 1.0,
        sampler: str | None = None,
        particles: int | None = None,
        progress: bool = True,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        use_clipped_model_output: bool | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Sample ``batch_size`` images, guided by an off-the-shelf model when ``guide`` is given.

        Args:
            batch_size: number of images; by default that of ``latents``, else one per prompt of a
                ``prompt`` list (or per row of ``prompt_embeds``) times ``num_images_per_prompt``,
                else 1.
            num_inference_steps: S, the sampler's steps on the scheduler's timestep spacing.
            eta: DDIM eta (0 = deterministic DDIM; ignored by DDPM).
            use_clipped_model_output: DDIM with the scheduler's ``clip_sample``: step with eps
                re-derived from the clipped x0 (diffusers' ``DDIMPipeline`` option). None: in
                guided steps (as the official PPAP code's DDIM), not in unguided ones (diffusers'
                default, so that unguided sampling is diffusers' own).
            generator: a generator or one per image (diffusers' habit: CPU generators give the same
                noise on every device).
            latents: x_T [B, C, H, W] given by the caller (else drawn from ``generator``).
            output_type: "pil", "np" ([B, H, W, C] in [0, 1]), "pt" ([B, C, H, W] in [0, 1]) or
                "latent" (the raw [B, C, H, W] sample in the model's [-1, 1] range).
            callback_on_step_end: ``fn(pipe, i, t, callback_kwargs) -> dict | None`` after each
                step, or a diffusers ``PipelineCallback`` / ``MultiPipelineCallbacks`` (whose
                ``tensor_inputs`` then name the inputs); a returned ``{"latents": ...}`` replaces
                the sample.
            callback_on_step_end_tensor_inputs: the ``callback_kwargs`` keys, among
                ``_callback_tensor_inputs``: "latents" (x after the step), "x0" (the step's
                clean-image estimate) and "guidance" (its scaled guidance gradient, None unguided).
            guide, experts, target, target_image, method, classifier_scale, calibration, task: one
                guidance term (see ``guidance_term``); methods: unguided, naive, ppap, noise-aware,
                multi-expert-supervised, x0, x0-shortcut. ``guide`` and ``experts`` given as modules
                must be on the pipeline's execution device (they are not moved); given as a folder,
                zoo name or hub id, they are loaded there.
            terms: further guidance terms (composed guidance: their gradients add), each with
                ``batch_size`` targets (``guidance_term(batch_size, ...)``).
            class_labels, prompt_embeds, negative_prompt_embeds, negative_class_labels,
                guidance_scale: conditions of a conditional UNet and classifier-free guidance
                (diffusers' meaning: 1 = off).
            prompt, negative_prompt: text (one, or one per image) encoded by the pipeline's text
                encoder (``encode_prompt``) instead of ``prompt_embeds``; with guidance_scale > 1
                the unconditional branch is ``negative_prompt``, else the empty prompt.
            num_images_per_prompt: images of each prompt (diffusers' meaning: a list of P prompts
                gives P * num_images_per_prompt images, each prompt's together).
            sampler: one of ``ppap.schedulers.SAMPLER_NAMES`` (ddim, ddpm, dpm++, unipc, euler,
                euler-a, heun), built from the scheduler's config; default: the registered
                scheduler itself (as diffusers samples), e.g. DDPMScheduler -> ddpm.
            particles: K, for the particle methods (best-of-n, fk, tds, ppap-smc, ppap-fk; ``ppap.particles``):
                K trajectories per image, one returned; their ``classifier_scale`` is the exponent
                lambda of p(y | x)^lambda. They take a classifier, the ddpm sampler or ddim with
                eta > 0, and return a ``ParticlePipelineOutput`` (its ``diagnostics``: the run).
            progress: show the step bar (``self.progress_bar``, configured by
                ``set_progress_bar_config``).
        """
        if output_type not in OUTPUT_TYPES:
            raise PPAPError(f"unknown output_type {output_type!r}; valid: {', '.join(OUTPUT_TYPES)}")
        scheduler = sampling_scheduler(self.scheduler, sampler, num_inference_steps)  # a fresh one: self.scheduler stays as it is
        if not (isinstance(eta, (int, float)) and np.isfinite(eta) and eta >= 0):
            raise PPAPError(f"eta must be a finite number >= 0, got {eta!r}")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise PPAPError(
                f"callback_on_step_end_tensor_inputs {unknown[0]!r} is not available; valid: {', '.join(self._callback_tensor_inputs)}"
            )
        diffusion = self.diffusion
        device = self._execution_device  # with CPU offload: the accelerator, not where the weights rest
        shape = diffusion.image_shape
        if latents is not None and (latents.ndim != 4 or tuple(latents.shape[1:]) != shape):
            raise PPAPError(f"latents have shape {list(latents.shape)}; this UNet takes [B, {', '.join(map(str, shape))}]")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise PPAPError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt!r}")
        if num_images_per_prompt > 1:  # each prompt's images together, as diffusers' pipelines order them
            prompt = [p for p in ([prompt] if isinstance(prompt, str) else prompt or []) for _ in range(num_images_per_prompt)] or None
            prompt_embeds = None if prompt_embeds is None else prompt_embeds.repeat_interleave(num_images_per_prompt, 0)
            if isinstance(negative_prompt, list):
                negative_prompt = [p for p in negative_prompt for _ in range(num_images_per_prompt)]
            if negative_prompt_embeds is not None:
                negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, 0)
        batch_size = _batch_size(batch_size, latents, prompt, prompt_embeds)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise PPAPError(f"{len(generator)} generators for a batch of {batch_size} images (give one, or one per image)")
        scheduler.set_timesteps(num_inference_steps)  # a fresh copy: its length is the number of UNet calls (Heun: 2S - 1)
        self._num_timesteps = len(scheduler.timesteps)
        if prompt is not None:
            if prompt_embeds is not None:
                raise PPAPError("give prompt or prompt_embeds, not both")
            prompt_embeds, encoded = self.encode_prompt(prompt, negative_prompt, guidance_scale > 1)
            negative_prompt_embeds = encoded if negative_prompt_embeds is None else negative_prompt_embeds
        elif negative_prompt is not None:
            raise PPAPError("negative_prompt needs a prompt (with prompt_embeds, pass negative_prompt_embeds)")
        cond = self.conditioning(
            batch_size,
            class_labels=class_labels,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_class_labels=negative_class_labels,
            guidance_scale=guidance_scale,
        )
        if cond is not None:
            cond = cond.to(device)
        restore_given = snapshot_modes(guide, experts, *(m for t in terms for m in (t.net, t.experts)))
        try:
            first = self.guidance_term(
                batch_size,
                guide=guide,
                experts=experts,
                target=target,
                target_image=target_image,
                method=method,
                classifier_scale=classifier_scale,
                calibration=calibration,
                task=task,
            )
            all_terms = ([first] if first is not None else []) + list(terms)
            for term in all_terms:
                if len(term.targets) != batch_size:
                    raise PPAPError(f"a guidance term has {len(term.targets)} targets for a batch of {batch_size} images")
                if term.net is not None:
                    check_device(term.net, device, "guide")
                if term.experts is not None:
                    check_device(term.experts, device, "expert bank")
            denoiser = diffusion.bind(cond)
            run = None
            if particles is not None or any(term.method in PARTICLE_METHODS for term in all_terms):
                if callback_on_step_end is not None:
                    raise PPAPError("callback_on_step_end is not available with a particle method")
                with self._step_progress(progress, self._num_timesteps) as bar:
                    run = sample_particle_term(
                        all_terms,
                        particles,
                        self.diffusion,
                        scheduler,
                        num_inference_steps,
                        eta,
                        cond,
                        generator,
                        latents,
                        batch_size,
                        self._execution_device,
                        bar,
                    )
                x = run.images
            else:
                x = self._sample_gradient(
                    all_terms,
                    denoiser,
                    scheduler,
                    num_inference_steps,
                    eta,
                    use_clipped_model_output,
                    generator,
                    latents,
                    batch_size,
                    progress,
                    callback_on_step_end,
                    callback_on_step_end_tensor_inputs,
                )
        except NonFiniteError as e:
            raise PPAPError(f"{' + '.join(t.description for t in all_terms) or 'unguided sampling'}: {e}") from None
        finally:
            restore_given()  # the caller's modules as they came: guidance ran them frozen, in eval mode
            self.maybe_free_model_hooks()  # enable_model_cpu_offload: the UNet back to the CPU
        image: Any = x if output_type == "latent" else (x / 2 + 0.5).clamp(0, 1)
        if output_type in ("np", "pil"):
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image) if run is None else ParticlePipelineOutput(images=image, diagnostics=run)

    def _sample_gradient(
        self,
        all_terms,
        denoiser,
        scheduler,
        num_inference_steps,
        eta,
        use_clipped_model_output,
        generator,
        latents,
        batch_size,
        progress,
        callback,
        tensor_inputs,
    ) -> Tensor:
        """x_0 [B, C, H, W] of the scheduler's loop with the terms' summed gradient guidance."""
        guidance = compose(all_terms, denoiser)
        device = self._execution_device
        if latents is None:
            x = randn_tensor((batch_size,) + self.image_shape, generator=generator, device=device, dtype=torch.float32)
        else:
            x = latents.to(torch.float32).to(device)  # cast first: float64 latents cannot go to MPS

        state_keys = {"latents": "x", "x0": "x0", "guidance": "guidance"}  # callback name -> the loop's state key

        def on_step(state: dict) -> Tensor | None:
            if callback is None:
                return None
            kwargs = {k: state[state_keys[k]] for k in tensor_inputs}
            out = callback(self, state["i"], state["t"], kwargs)
            return out.get("latents") if isinstance(out, dict) else None

        with self._step_progress(progress, self._num_timesteps) as bar:
            return sample(
                denoiser,
                x,
                scheduler,
                num_inference_steps,
                guidance=guidance,
                eta=eta,
                use_clipped_model_output=use_clipped_model_output,
                generator=generator,
                callback=on_step,
                progress=bar,
            )


def _batch_size(batch_size: int | None, latents: Tensor | None, prompt, prompt_embeds: Tensor | None) -> int:
    """The call's number of images: ``batch_size`` when given (it must agree with ``latents``),
    else that of ``latents``, of a prompt list, of ``prompt_embeds``' rows, or 1."""
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise PPAPError(f"batch_size must be >= 1, got {batch_size!r}")
    if latents is not None:
        if batch_size is not None and batch_size != latents.shape[0]:
            raise PPAPError(f"batch_size {batch_size} disagrees with the {latents.shape[0]} latents given")
        return int(latents.shape[0])
    if batch_size is not None:
        return batch_size
    if isinstance(prompt, (list, tuple)) and prompt:
        return len(prompt)
    if prompt is None and prompt_embeds is not None:
        return int(prompt_embeds.shape[0])
    return 1
