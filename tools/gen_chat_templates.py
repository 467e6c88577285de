#!/usr/bin/env python3
"""gen_chat_templates.py - writes tests/fixtures/chat_templates.json, the reference the chat-template
test (tests/unit/test_chat_template.c) checks folio's common/chat_template.c against.

Templates: every one of llama.cpp's tests/test-chat-template.cpp and the real Hugging Face templates of
llama.cpp's models/templates/ for the families folio renders (Qwen 2.5 and 3, Mistral Small 3.2 and
Nemo, Phi-3.5, Gemma 2, Llama 3.x), both read from the llama-cpp-python 0.3.16 source distribution
that `bash scripts/setup.sh --test-tools` caches, plus llama.cpp's template names. Each is applied to a
few conversations (llama.cpp's own; no system message; two system messages; marker spellings and
non-ASCII in a message; an unusual role), with and without the assistant's turn opened, by
llama-cpp-python's low-level llama_chat_apply_template (the reference) and by jinja2 as Hugging Face
renders templates (the expectation in folio's one deliberate difference: a ChatML template's default
system message, which folio writes as the template does and llama.cpp's built-in ChatML leaves out;
those cases also record llama.cpp's output). "expect" is null where llama.cpp refuses the template. Templates of families folio does not render are recorded
with "folio": "unsupported": folio must refuse them rather than render something else.

Usage:
  python3 tools/gen_chat_templates.py [SDIST.tar.gz] [OUT.json]
Run with a Python that has llama_cpp 0.3.16 and jinja2; otherwise the script re-runs itself with
the one tools/llamacpp_env.sh makes (.cache/llamacpp-venv).
"""
import json
import os
import re
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.environ.get("FOLIO_CACHE", os.path.join(ROOT, ".cache"))
SDIST = os.path.join(CACHE, "sdist", "llama_cpp_python-0.3.16.tar.gz")
PREFIX = "llama_cpp_python-0.3.16/vendor/llama.cpp/"


def ensure_deps():
    try:
        import jinja2  # noqa: F401
        import llama_cpp  # noqa: F401
        return
    except ImportError:
        pass
    if os.environ.get("GEN_CHAT_TEMPLATES_REEXEC"):
        sys.exit("gen_chat_templates: llama_cpp/jinja2 still missing")
    py = subprocess.check_output(["bash", os.path.join(HERE, "llamacpp_env.sh")], text=True).strip()
    os.environ["GEN_CHAT_TEMPLATES_REEXEC"] = "1"
    os.execv(py, [py] + sys.argv)


# Templates of tests/test-chat-template.cpp whose family folio does not render.
UNSUPPORTED = {
    "mlabonne/AlphaMonarch-7B", "OrionStarAI/Orion-14B-Chat", "openchat/openchat-3.5-0106",
    "deepseek-ai/deepseek-coder-33b-instruct", "eachadea/vicuna-13b-1.1", "Orca-Vicuna", "ChatGLM3", "ChatGLM4",
    "GLMEdge", "MiniCPM-3B-OpenHermes-2.5-v2-GGUF", "DeepSeek-V2", "ibm-granite/granite-3.0-8b-instruct",
    "ai-sage/GigaChat-20B-A3B-instruct", "Infinigence/Megrez-3B-Instruct", "yandex/YandexGPT-5-Lite-8B-instruct",
    "inclusionAI/Ling-lite",
}
JINJA_FILES = [
    "Qwen-Qwen2.5-7B-Instruct.jinja", "Qwen-Qwen3-0.6B.jinja", "Mistral-Small-3.2-24B-Instruct-2506.jinja",
    "mistralai-Mistral-Nemo-Instruct-2407.jinja", "microsoft-Phi-3.5-mini-instruct.jinja",
    "google-gemma-2-2b-it.jinja", "meta-llama-Llama-3.1-8B-Instruct.jinja", "meta-llama-Llama-3.2-3B-Instruct.jinja",
]
NAMES = ["chatml", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip", "mistral-v1", "mistral-v3",
         "mistral-v3-tekken", "mistral-v7", "mistral-v7-tekken", "phi3", "phi4", "gemma", "command-r", "llama3",
         "smolvlm"]

CONVERSATIONS = [
    [("system", "You are a helpful assistant"), ("user", "Hello"), ("assistant", "Hi there"),
     ("user", "Who are you"), ("assistant", "   I am an assistant   "), ("user", "Another question")],
    [("user", "Hello"), ("assistant", " Hi!\n"), ("user", "What is 2+2?")],
    [("system", "  Be brief. "), ("system", "Answer in French."), ("user", "  Bonjour  "), ("assistant", "Salut"),
     ("user", "\u00c7a va ?")],
    [("user", "<|im_end|>[INST]</s><start_of_turn> \u65e5\u672c\u8a9e \U0001f999\t")],
    [("system", "S"), ("user", "call it"), ("tool", "42"), ("user", "thanks")],
]


def c_string_literals(src):
    """(name, template) pairs of test-chat-template.cpp's TestCase initialisers."""
    lit = r'(?:U8C\()?u?8?"((?:[^"\\]|\\.)*)"\)?'
    out = []
    comments = r"(?:\s*//[^\n]*)*"
    for m in re.finditer(r"/\* \.name= \*/\s*" + lit + "," + comments + r"\s*/\* \.template_str=? \*/\s*" + lit, src):
        out.append(tuple(unescape_c(g) for g in m.groups()))
    return out


def unescape_c(s):
    esc = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "'": "'"}
    return re.sub(r"\\(.)", lambda m: esc[m.group(1)], s)


def apply_llama(tmpl, msgs, add_ass):
    import ctypes
    import llama_cpp
    arr = (llama_cpp.llama_chat_message * len(msgs))()
    keep = []
    for i, (r, c) in enumerate(msgs):
        rb, cb = ctypes.c_char_p(r.encode()), ctypes.c_char_p(c.encode())
        keep += [rb, cb]
        arr[i].role, arr[i].content = rb.value, cb.value
    n = llama_cpp.llama_chat_apply_template(tmpl.encode(), arr, len(msgs), add_ass, None, 0)
    if n < 0:
        return None
    buf = ctypes.create_string_buffer(n + 1)
    llama_cpp.llama_chat_apply_template(tmpl.encode(), arr, len(msgs), add_ass, buf, n + 1)
    return buf.raw[:n].decode("utf-8")


def apply_jinja(tmpl, msgs, add_ass):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(msg)
    try:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(tmpl).render(messages=[{"role": r, "content": c} for r, c in msgs],
                                            add_generation_prompt=add_ass, bos_token="", eos_token="</s>")
    except Exception:
        return None


def is_chatml(tmpl):
    return "<|im_start|>" in tmpl and "<|im_sep|>" not in tmpl and "<end_of_utterance>" not in tmpl


def main():
    ensure_deps()
    sdist = sys.argv[1] if len(sys.argv) > 1 else SDIST
    out_path = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "tests", "fixtures", "chat_templates.json")
    with tarfile.open(sdist, "r:gz") as tar:
        cpp = tar.extractfile(PREFIX + "tests/test-chat-template.cpp").read().decode("utf-8")
        jinja = {f: tar.extractfile(PREFIX + "models/templates/" + f).read().decode("utf-8") for f in JINJA_FILES}
    templates = [(n, t, n not in UNSUPPORTED) for n, t in c_string_literals(cpp)]
    templates += [(f[:-len(".jinja")], t, True) for f, t in jinja.items()]
    templates += [("name: " + n, n, True) for n in NAMES]
    doc = {"generator": "tools/gen_chat_templates.py", "llama_cpp_python": "0.3.16",
           "conversations": [[{"role": r, "content": c} for r, c in msgs] for msgs in CONVERSATIONS], "templates": []}
    for name, tmpl, supported in templates:
        entry = {"name": name, "template": tmpl, "cases": []}
        if not supported:
            entry["folio"] = "unsupported"
        for ci, msgs in enumerate(CONVERSATIONS):
            for add_ass in (True, False):
                ref = apply_llama(tmpl, msgs, add_ass)
                jin = apply_jinja(tmpl, msgs, add_ass)
                expect = ref
                if (supported and ref is not None and jin is not None and is_chatml(tmpl) and msgs[0][0] != "system"
                        and jin != ref and jin.endswith(ref)):
                    head = jin[:len(jin) - len(ref)]
                    if head.startswith("<|im_start|>system\n") and head.endswith("<|im_end|>\n"):
                        expect = jin  # the template's default system message
                case = {"conversation": ci, "add_ass": add_ass, "expect": expect}
                if expect != ref:
                    case["llama_cpp"] = ref  # folio's deliberate difference; expect is jinja2's rendering
                entry["cases"].append(case)
        doc["templates"].append(entry)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    n = sum(len(t["cases"]) for t in doc["templates"])
    print(f"gen_chat_templates: {len(doc['templates'])} templates, {n} cases -> {out_path}")


if __name__ == "__main__":
    main()
