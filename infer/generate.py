"""Generate text from a checkpoint.

    python -m infer.generate --model PATH --prompt TEXT [--prompt TEXT ...] [--chat] [--no-thinking]
        [--image PATH ...] [--video PATH ...] [--video-fps F]
        [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--seed S] [--json]
    python -m infer.generate --model PATH --interactive        # a chat loop; the decode state is kept

Sampling defaults are Qwen3.5's recommendations: the thinking preset for --chat, else the non-thinking one;
--temperature 0 is greedy. Text streams to stdout; --json prints one JSON object per prompt instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from infer.engine import Engine
from infer.sampling import SamplingParams
from qwen35_jax.cli import argument_parser, command


PRESET = " (default: the preset's, see below)"
SAMPLING_FLAGS = {"temperature": (float, "0 is greedy" + PRESET), "top-p": (float, "nucleus mass" + PRESET),
                  "top-k": (int, "0: off" + PRESET), "min-p": (float, "relative to the top probability" + PRESET),
                  "presence-penalty": (float, "on generated tokens" + PRESET),
                  "frequency-penalty": (float, "on generated tokens" + PRESET),
                  "repetition-penalty": (float, "on prompt and generated tokens, 1: off" + PRESET),
                  "seed": (int, "sampling seed (default: a fresh random seed per prompt)")}


def _preset_text(preset) -> str:
    params = preset()
    return ", ".join(f"{k} {getattr(params, k)}" for k in ("temperature", "top_p", "top_k", "min_p",
                                                             "presence_penalty") if getattr(params, k))


def sampling_help() -> str:
    return ("sampling defaults (Qwen3.5's recommended presets; each flag overrides one value):\n"
            f"  plain prompts and --no-thinking: {_preset_text(SamplingParams.non_thinking)}\n"
            f"  --chat / --interactive (thinking): {_preset_text(SamplingParams.thinking)}\n"
            "  --temperature 0 decodes greedily (deterministic).")


def build_parser() -> argparse.ArgumentParser:
    p = argument_parser("Generate text with a Qwen3.5 checkpoint.", module=__name__, epilog=sampling_help())
    p.add_argument("--model", required=True, help="checkpoint folder: Orbax (from convert or finetune) or HF "
                   "(config.json, safetensors, tokenizer)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat template")
    p.add_argument("--no-thinking", action="store_true", help="chat without the thinking block")
    p.add_argument("--interactive", action="store_true", help="chat loop keeping the decode state")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for every prompt (repeatable; before the prompt text, in the user message "
                        "with --chat)")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="a video file for every prompt (repeatable; needs the `video` extra: PyAV)")
    p.add_argument("--video-fps", type=float, default=None,
                   help="the videos' source frame rate (default: the file's own rate); frames are sampled at 2 fps")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate per prompt at most")
    for name, (kind, text) in SAMPLING_FLAGS.items():
        p.add_argument(f"--{name}", type=kind, default=None, help=text)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="parameter dtype")
    p.add_argument("--max-len", type=int, default=4096, help="decode state length (prompt + new tokens)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="speculative decoding: K tokens (1-4) drafted by the checkpoint's MTP block per step and "
                        "verified in one forward (0: off)")
    return p


def sampling_from_args(args) -> SamplingParams:
    preset = SamplingParams.non_thinking if (args.no_thinking or not (args.chat or args.interactive)) \
        else SamplingParams.thinking
    overrides = {"max_new_tokens": args.max_new_tokens, "stop": tuple(args.stop)}
    for field in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "seed"):
        value = getattr(args, field)
        if value is not None:
            overrides[field] = value
    return preset(**overrides)


def render(engine: Engine, messages: list[dict], thinking: bool) -> list[int]:
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages, enable_thinking=thinking))


def user_content(args, text: str):
    """A user message's content: the text, or the images and videos first and then the text."""
    if not (args.image or args.video):
        return text
    return ([{"type": "image", "image": path} for path in args.image]
            + [{"type": "video", "video": path, "source_fps": args.video_fps} for path in args.video]
            + [{"type": "text", "text": text}])


def build_prompt(engine: Engine, args, text: str):
    """Token ids (--chat), the text itself, or a VisionPrompt when images or videos are given."""
    if args.chat:
        messages = [{"role": "user", "content": user_content(args, text)}]
        if args.image or args.video:
            return engine.vision_prompt(messages=messages, enable_thinking=not args.no_thinking)
        return render(engine, messages, not args.no_thinking)
    if args.image or args.video:
        return engine.vision_prompt(text, args.image, args.video, video_fps=args.video_fps)
    return text


def run_batch(engine: Engine, args, params: SamplingParams) -> None:
    prompts = [build_prompt(engine, args, p) for p in args.prompt]
    if args.json:
        for prompt, result in zip(args.prompt, engine.generate(prompts, params)):
            print(json.dumps({"prompt": prompt, **dataclasses.asdict(result)}))
        return
    for event in engine.stream(prompts, params):
        prefix = f"[{event.index}] " if len(prompts) > 1 and event.text else ""
        print(prefix + event.text, end="", flush=True)
        if event.finish_reason:
            print(f"\n[{event.index} finished: {event.finish_reason}]" if len(prompts) > 1 else "")


def run_interactive(engine: Engine, args, params: SamplingParams) -> None:
    """Each turn feeds only the tokens the decode state has not seen (re-prefills if the template
    rewrote history, e.g. by dropping earlier reasoning)."""
    messages, fed, state = [], [], None
    while True:
        try:
            line = input("\n> ")
        except EOFError:
            return
        if line.strip() in ("", "/exit", "/quit"):
            return
        messages.append({"role": "user", "content": line})
        tokens = render(engine, messages, not args.no_thinking)
        if state is None or tokens[:len(fed)] != fed or len(tokens) + params.max_new_tokens >= engine.max_len:
            state, fed = None, []
        reply = []
        for event in engine.stream([tokens[len(fed):]], params, state=state):
            print(event.text, end="", flush=True)
            reply.append(event)
        state = engine.last_state
        fed = tokens + [e.token_id for e in reply[:-1]]
        messages.append({"role": "assistant", "content": "".join(e.text for e in reply)})


@command
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.prompt and not args.interactive:
        parser.error("give --prompt TEXT (repeatable) or --interactive")
    if args.interactive and (args.image or args.video):
        parser.error("--image / --video go with --prompt, not --interactive")
    params = sampling_from_args(args)
    engine = Engine.load(args.model, dtype=args.dtype, max_len=args.max_len, num_speculative_tokens=args.speculative)
    if engine.tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer.json or tokenizer.model; text prompts need one")
    if args.interactive:
        run_interactive(engine, args, params)
    else:
        run_batch(engine, args, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
