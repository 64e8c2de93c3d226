#!/usr/bin/env python3
"""Checks dialogd's OpenAI-compatible API with the official `openai` client.

Not part of CI (it needs Python and the `openai` package); run it by hand
against a running daemon:

    pip install openai
    scripts/openai_client_check.py --base-url http://127.0.0.1:8080/v1 --api-key "$DIALOGD_HTTP_TOKEN"

It lists the models, asks for a completion (n=2, a seed, a stop string),
streams one, and checks that a missing key and a bad request come back as
the client's own exception types. Exits non-zero on the first failure.
"""

import argparse
import sys

import openai


def check(condition, what):
    if not condition:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key", default="none", help="the daemon's adapters.http.token (any text when it has none)")
    parser.add_argument("--model", help="the model or persona to use (default: the first /v1/models lists)")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    models = [m.id for m in client.models.list()]
    check(len(models) >= 1, f"models listed: {models}")
    model = args.model or models[0]

    messages = [
        {"role": "system", "content": "ignored: DialoGPT takes no instructions"},
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I'm fine, thanks."},
        {"role": "user", "content": "What do you like to do?"},
    ]
    reply = client.chat.completions.create(model=model, messages=messages, n=2, seed=42, max_tokens=24, user="openai-check")
    check(reply.object == "chat.completion", f"completion id {reply.id}")
    check(len(reply.choices) == 2, f"two choices: {[c.message.content for c in reply.choices]}")
    check(all(c.finish_reason in ("stop", "length", "content_filter") for c in reply.choices), "finish reasons")
    check(reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens, f"usage {reply.usage}")
    again = client.chat.completions.create(model=model, messages=messages, n=2, seed=42, max_tokens=24, user="openai-check")
    check([c.message.content for c in again.choices] == [c.message.content for c in reply.choices], "the same seed, the same replies")

    stream = client.chat.completions.create(model=model, messages=messages, seed=42, max_tokens=24, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    streamed = "".join(pieces)
    check(streamed == reply.choices[0].message.content, f"streamed reply {streamed!r} is the best choice")
    check(finish is not None, f"stream finished: {finish}")

    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
        check(False, "an unknown model is refused")
    except openai.NotFoundError as e:
        check(e.status_code == 404, f"unknown model: {e.message}")
    try:
        client.chat.completions.create(model=model, messages=messages, temperature=5)
        check(False, "temperature 5 is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.body.get("param") == "temperature", f"bad request: {e.message}")
    if args.api_key != "none":
        try:
            openai.OpenAI(base_url=args.base_url, api_key="wrong", max_retries=0).models.list()
            check(False, "a wrong key is refused")
        except openai.AuthenticationError as e:
            check(e.status_code == 401, f"wrong key: {e.message}")
    print("all checks passed")


if __name__ == "__main__":
    main()
