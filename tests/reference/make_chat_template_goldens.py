#!/usr/bin/env python3
"""Renders the chat-template fixtures with transformers' own jinja2 setup and writes goldens.

Every template in tests/fixtures/chat_templates/*.jinja is rendered against a set of
conversations, and a list of small inline templates ("probes") checks individual Jinja
semantics. Rendering goes through transformers' `_compile_jinja_template` (the environment
`apply_chat_template` uses: ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
loopcontrols, AssistantTracker, its `tojson` and `raise_exception`), then
`template.render(**context)`: exactly what `apply_chat_template(..., tokenize=False)` does,
with `context` holding what it passes (messages, tools, documents, add_generation_prompt, the
special tokens and extra kwargs). For conversation cases the script also checks that
transformers' `render_jinja_template` gives the same text.

Writes tests/fixtures/chat_templates/goldens.json: a list of
  {"template": <fixture file name or probe name>, "source": <inline text, probes only>,
   "context": {...}, "expected": <text>}  or  {..., "error_contains": <text>}
read by tests/tokenizer/chat_template_test.cc (CI has no transformers).

  python3 tests/reference/make_chat_template_goldens.py          # rewrite goldens.json
  python3 tests/reference/make_chat_template_goldens.py --check  # exit 1 if it is stale

Needs transformers (4.57.1 was used) and jinja2 (3.1.6).
"""

import argparse
import copy
import json
import pathlib
import sys

import jinja2
import transformers
from transformers.utils.chat_template_utils import _compile_jinja_template, render_jinja_template

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "chat_templates"
GOLDENS = FIXTURES / "goldens.json"

# Special tokens each fixture's tokenizer passes (tokenizer.special_tokens_map).
TOKENS = {
    "mixtral_8x7b_instruct.jinja": {"bos_token": "<s>", "eos_token": "</s>"},
    "qwen2_moe_chatml.jinja": {"bos_token": None, "eos_token": "<|im_end|>"},
    "qwen3_moe.jinja": {"bos_token": None, "eos_token": "<|im_end|>"},
    "zephyr_tulu_style.jinja": {"bos_token": "<s>", "eos_token": "</s>"},
    "kitchen_sink.jinja": {"bos_token": "<s>", "eos_token": "</s>"},
}

USER = {"role": "user", "content": "Hello! How are you?"}
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
ASSISTANT = {"role": "assistant", "content": "I am fine, thanks."}
USER2 = {"role": "user", "content": "Tell me a joke."}
UNICODE = {"role": "user", "content": "  Grüße, 世界! 🙂 café\t\n\nline two  \n"}
QUOTES = {"role": "user", "content": "He said \"hi\" and 'bye' \\ {{ not a tag }} {% raw %}"}

CONVERSATIONS = {
    "single_user": [USER],
    "system_user": [SYSTEM, USER],
    "multi_turn": [USER, ASSISTANT, USER2],
    "ends_with_assistant": [SYSTEM, USER, ASSISTANT],
    "unicode_whitespace": [UNICODE, {"role": "assistant", "content": "\n  ok  \n"}, QUOTES],
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city; returns °C.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "default": 1}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "now", "description": "Current time", "parameters": {}}}

QWEN3_CONVERSATIONS = {
    "reasoning_content_last": [
        USER,
        {"role": "assistant", "content": "\nFine.", "reasoning_content": "\nThe user greets me.\n"},
    ],
    "think_in_content_history": [
        USER,
        {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nOld answer."},
        USER2,
        {"role": "assistant", "content": "<think>\nnew reasoning\n</think>\n\nWhy did the chicken..."},
    ],
    "reasoning_content_none": [USER, {"role": "assistant", "content": "Plain.", "reasoning_content": None}],
    "tool_calls": [
        SYSTEM,
        {"role": "user", "content": "Weather in Paris and the time?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
                {"type": "function", "function": {"name": "now", "arguments": "{\"tz\": \"CET\"}"}},
            ],
        },
        {"role": "tool", "content": "{\"temp\": 21.5}"},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "21.5 °C at noon."},
    ],
    "tool_call_no_content": [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "now", "arguments": {}}]},
        {"role": "tool", "content": "12:00"},
    ],
    "multi_step_tool_user": [
        {"role": "user", "content": "Start"},
        {"role": "assistant", "content": "<think>\nplan\n</think>\n\nCalling."},
        {"role": "user", "content": "<tool_response>\nresult\n</tool_response>"},
        {"role": "assistant", "content": "<think>\nfinish\n</think>\n\nDone."},
    ],
}


def render(source, context):
    """One case: the rendered text, or the error message."""
    try:
        return {"expected": _compile_jinja_template(source).render(**copy.deepcopy(context))}
    except jinja2.TemplateError as e:
        return {"error": str(e)}
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError, KeyError) as e:
        return {"error": str(e)}


def apply_chat_template_context(name, messages, add_generation_prompt, **kwargs):
    """What apply_chat_template passes to template.render()."""
    context = {"messages": messages, "tools": None, "documents": None, "add_generation_prompt": add_generation_prompt}
    context.update(TOKENS[name])
    context.update(kwargs)
    return context


def check_against_render_jinja_template(source, context, expected):
    extra = {k: v for k, v in context.items() if k not in ("messages", "tools", "documents", "add_generation_prompt")}
    rendered, _ = render_jinja_template(
        conversations=[copy.deepcopy(context["messages"])],
        tools=context["tools"],
        documents=context["documents"],
        chat_template=source,
        add_generation_prompt=context["add_generation_prompt"],
        **extra,
    )
    assert rendered[0] == expected, "render_jinja_template disagrees with _compile_jinja_template().render()"


def conversation_cases():
    cases = []

    def add(name, context, error_contains=None):
        source = (FIXTURES / name).read_text(encoding="utf-8")
        result = render(source, context)
        case = {"template": name, "context": context}
        if "expected" in result:
            if error_contains is not None:
                sys.exit(f"{name}: expected an error containing {error_contains!r}, rendered fine")
            check_against_render_jinja_template(source, context, result["expected"])
            case["expected"] = result["expected"]
        else:
            if error_contains is None or error_contains not in result["error"]:
                sys.exit(f"{name}: unexpected error {result['error']!r} for {json.dumps(context)[:200]}")
            case["error_contains"] = error_contains
        cases.append(case)

    for name in TOKENS:
        for conversation in CONVERSATIONS.values():
            for add_generation_prompt in (False, True):
                add(name, apply_chat_template_context(name, conversation, add_generation_prompt))

    mixtral = "mixtral_8x7b_instruct.jinja"
    add(mixtral, apply_chat_template_context(mixtral, [USER, USER2], True),
        error_contains="conversation roles must alternate user/assistant/user/assistant/...")
    add(mixtral, apply_chat_template_context(mixtral, [SYSTEM, ASSISTANT], False),
        error_contains="conversation roles must alternate")
    add(mixtral, apply_chat_template_context(mixtral, [USER, {"role": "tool", "content": "x"}], False),
        error_contains="Only user and assistant roles are supported")

    qwen3 = "qwen3_moe.jinja"
    for conversation in QWEN3_CONVERSATIONS.values():
        for add_generation_prompt in (False, True):
            add(qwen3, apply_chat_template_context(qwen3, conversation, add_generation_prompt))
    for conversation in (CONVERSATIONS["single_user"], CONVERSATIONS["multi_turn"]):
        add(qwen3, apply_chat_template_context(qwen3, conversation, True, enable_thinking=False))
        add(qwen3, apply_chat_template_context(qwen3, conversation, True, enable_thinking=True))
    for conversation in (CONVERSATIONS["system_user"], QWEN3_CONVERSATIONS["tool_calls"], CONVERSATIONS["single_user"]):
        context = apply_chat_template_context(qwen3, conversation, True)
        context["tools"] = [WEATHER_TOOL, TIME_TOOL]
        add(qwen3, context)
    add(qwen3, apply_chat_template_context(qwen3, [], True), error_contains="has no element 0")

    chatml = "qwen2_moe_chatml.jinja"
    add(chatml, apply_chat_template_context(chatml, [{"role": "user", "content": 5}], True),
        error_contains='can only concatenate str (not "int") to str')

    sink = "kitchen_sink.jinja"
    for extra in ({"user_name": "Ada"}, {}):
        multimodal = [
            {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image"}]},
            {"role": "assistant", "content": None},
            {"role": "ignored", "content": "skip me"},
            {"role": "user", "content": "line1\nline2"},
        ]
        add(sink, apply_chat_template_context(sink, multimodal, True, **extra))
    add(sink, apply_chat_template_context(sink, [], False))
    return cases


# Inline probes: (name, template, context, None or the text the error must contain).
PROBES = [
    ("trim_blocks", "{% if true %}\nA\n{% endif %}\nB\n", {}, None),
    ("lstrip_blocks", "x\n    {% if true %}y{% endif %}\n  {# c #}\nz", {}, None),
    ("lstrip_not_for_output", "a\n    {{ 'b' }}\n", {}, None),
    ("plus_disables_lstrip", "a\n    {%+ if true %}b{% endif %}", {}, None),
    ("plus_disables_trim", "{% if true +%}\nb{% endif %}", {}, None),
    ("minus_both_sides", "a  \n {%- if true -%}  \n b {{- ' c ' -}} \n d {%- endif %} e", {}, None),
    ("comment_whitespace", "a {#- c -#} b\n{# d #}\ne", {}, None),
    ("crlf_and_trailing_newline", "a\r\nb\r{% if 1 %}\r\nc{% endif %}\n\n", {}, None),
    ("string_escapes", "{{ 'tab\\there\\nnl \\u00e9 \\x41 \\101 \\\\ \\' \\q' }}|{{ \"dq \\\"x\\\"\" }}", {}, None),
    ("adjacent_strings", "{{ 'a' 'b' \"c\" }}", {}, None),
    ("numbers", "{{ 1_000 }} {{ 0x1F }} {{ 0o17 }} {{ 0b101 }} {{ 1.5e3 }} {{ 2.50 }} {{ -0.0 }} {{ 1e100 }} {{ 123456789.125 }}", {}, None),
    ("float_repr", "{{ 1/3 }} {{ 2/3*3 }} {{ 1e15 }} {{ 1e16 }} {{ 0.0001 }} {{ 0.00001 }} {{ 5e-324 }} {{ 1.7976931348623157e308 }}", {}, None),
    ("python_repr", "{{ ['it\\'s', \"q\\\"\", 'both\\'\"', '\\n\\t\\x01\\x7f', 'é🙂'] }} {{ {1: none, 'k': (1, 2)} }} {{ (none,) }}", {}, None),
    ("print_values", "{{ none }} {{ true }} {{ false }} {{ x }} {{ [] }} {{ {} }} {{ ns }}", {"x": None, "ns": None}, None),
    ("context_types", "{{ i }} {{ f }} {{ f2 }} {{ b }} {{ n }} {{ l }} {{ d }} {{ big }}", {"i": 3, "f": 2.0, "f2": 0.1, "b": True, "n": None, "l": [1, "a"], "d": {"z": 1, "a": [2]}, "big": 12345678901234}, None),
    ("precedence", "{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 2 ** 3 ** 2 }} {{ -2 ** 2 }} {{ 1 ~ (2 + 3) }} {{ 2 * 3 ~ 4 }} {{ not 1 == 2 }} {{ 1 if 0 else 2 if 1 else 3 }}", {}, None),
    ("unary_filter", "{{ -3 | abs }} {{ - 'x' | length if false else 'ok' }}", {}, None),
    ("division", "{{ 7 / 2 }} {{ 8 / 2 }} {{ -7 // 2 }} {{ 7 // -2 }} {{ -7 % 2 }} {{ 7.0 % -2 }} {{ -0.5 // 1 }} {{ 2 ** 0.5 }} {{ 10 ** 18 }}", {}, None),
    ("int_float_mix", "{{ 1 + 1.0 }} {{ 3 * 1.5 }} {{ true + true }} {{ 1 == true }} {{ 0.1 + 0.2 == 0.3 }} {{ 2 > 1.5 }}", {}, None),
    ("string_ops", "{{ 'ab' * 3 }} {{ 3 * 'ab' }} {{ 'ab' * -1 }} {{ 'a' ~ none ~ 1 ~ undefined_var }} {{ 'abc' + 'def' }}", {}, None),
    ("list_ops", "{{ [1, 2] + [3] }} {{ (1,) + (2,) }} {{ [0] * 3 }} {{ [1, [2, 3]] == [1, [2, 3]] }} {{ [1, 2] < [1, 2, 0] }}", {}, None),
    ("in_operator", "{{ 'b' in 'abc' }} {{ 'z' not in 'abc' }} {{ 1 in [1, 2] }} {{ 1.0 in [1] }} {{ 'k' in d }} {{ 'v' in d }} {{ 'x' in undefined_var }}", {"d": {"k": "v"}}, None),
    ("and_or_values", "{{ 0 or '' or 'z' }}|{{ 1 and 2 }}|{{ none or [] }}|{{ 'a' and 0 }}|{{ undefined_var or 'dflt' }}", {}, None),
    ("conditional_no_else", "[{{ 'x' if false }}] [{{ ('x' if false) is defined }}]", {}, None),
    ("slicing", "{{ s[1:] }} {{ s[:-1] }} {{ s[::2] }} {{ s[::-1] }} {{ s[-3:-1] }} {{ s[10:] }} {{ s[4:1:-1] }} {{ l[1:3] }} {{ l[::-2] }} {{ l[-100:100] }}", {"s": "héllo wörld", "l": [1, 2, 3, 4, 5]}, None),
    ("indexing", "{{ l[0] }} {{ l[-1] }} [{{ l[9] }}] {{ s[0] }} {{ s[-1] }} {{ d['a'] }} {{ d.a }} [{{ d.missing }}] {{ d['items'] }} {{ l[true] }}", {"l": [1, 2], "s": "xyz", "d": {"a": 1, "items": "key wins in []"}}, None),
    ("attribute_vs_item", "{{ d.items() | list }} {{ d['keys'] }} {{ d.get('keys') }}", {"d": {"keys": "k"}}, None),
    ("undefined_semantics", "[{{ u }}] {{ u is defined }} {{ u | length }} {{ u | default('d') }} {{ u | list }} {% for x in u %}never{% else %}empty{% endfor %} {{ u == u }} {{ not u }}", {}, None),
    ("none_attribute", "[{{ n.attr }}] {{ n.attr is defined }}", {"n": None}, None),
    ("loop_vars", "{% for x in 'abc' %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.previtem }}{{ loop.nextitem }}{{ loop.depth }};{% endfor %}", {}, None),
    ("loop_filter_and_else", "{% for x in range(6) if x % 2 %}{{ x }}/{{ loop.length }} {% else %}none{% endfor %}{% for x in [] %}x{% else %}empty{% endfor %}", {}, None),
    ("loop_unpacking", "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for a, b in [[1, 2], 'xy'] %}{{ a }}{{ b }}{% endfor %}", {"d": {"x": 1, "y": [2]}}, None),
    ("nested_loops", "{% for i in range(3) %}{% for j in range(i) %}{{ loop.index }}{{ i }}{% if j == 1 %}{% break %}{% endif %} {% endfor %}|{% endfor %}", {}, None),
    ("loop_scoping", "{% set x = 1 %}{% for i in range(3) %}{{ x }}{% set x = i + 10 %}{{ x }} {% endfor %}{{ x }}{% if true %}{% set y = 2 %}{% endif %}{{ y }}", {}, None),
    ("namespace", "{% set ns = namespace(a=1, items=[]) %}{% for i in range(3) %}{% set ns.a = ns.a * 2 %}{% set ns.items = ns.items + [i] %}{% endfor %}{{ ns.a }} {{ ns.items }} {{ ns['a'] }} [{{ ns.missing }}]", {}, None),
    ("namespace_from_dict", "{% set ns = namespace({'a': 1}, b=2) %}{{ ns.a }}{{ ns.b }}", {}, None),
    ("macro", "{% macro m(a, b='B', c=none) %}{{ a }}{{ b }}{{ c }}[{{ d }}]{% endmacro %}{{ m(1) }} {{ m(1, 2, 3) }} {{ m(c='C', a='A') }} {% set d = 'late' %}{{ m() }}", {}, None),
    ("macro_recursion", "{% macro fact(n) %}{% if n <= 1 %}1{% else %}{{ n * (fact(n - 1) | int) }}{% endif %}{% endmacro %}{{ fact(10) }}", {}, None),
    ("set_block", "{% set x %}\n  inner {{ 1 + 1 }}\n{% endset %}[{{ x }}] {{ x | length }}", {}, None),
    ("set_tuple", "{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set c, d = 'xy' %}{{ d }}{{ c }}", {}, None),
    ("tuple_print", "{{ 1, 2 }} {{ (1, 'a') }}", {}, None),
    ("generation_block", "a{% generation %}b{{ 1 }}{% endgeneration %}c", {}, None),
    ("str_methods", "{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ s.split() }}|{{ s.split(' ') }}|{{ 'a,b,,c'.split(',') }}|{{ 'a b c'.split(none, 1) }}|{{ 'x'.split('x') }}", {"s": " \t a  b \n"}, None),
    ("str_methods2", "{{ 'Hello World'.lower() }} {{ 'ß straße'.upper() | length }} {{ \"they're bill's friends\".title() }} {{ 'éCOLE'.capitalize() }} {{ 'aaa'.replace('a', 'b', 2) }} {{ 'ab'.replace('', '-') }} {{ 'héllo'.find('l') }} {{ 'x'.find('y') }} {{ 'aaaa'.count('aa') }}", {}, None),
    ("startswith_endswith", "{{ 'abc'.startswith('ab') }} {{ 'abc'.startswith(('x', 'a')) }} {{ 'abc'.endswith('bc') }} {{ 'abc'.endswith('') }} {{ ''.startswith('a') }}", {}, None),
    ("strip_chars", "{{ 'xxhixx'.strip('x') }} {{ '<<a>>'.lstrip('<') }} {{ '\\n\\nhi\\n'.rstrip('\\n') }} {{ 'abc'.strip('') }}", {}, None),
    ("filters_text", "{{ '  x  ' | trim }}|{{ 'hello WORLD' | capitalize }}|{{ 'hello-world foo(bar) [baz] <q>' | title }}|{{ 'ABC' | lower }}|{{ 5 | upper }}|{{ 'a.b.c' | replace('.', '/') }}|{{ 'aaa' | replace('a', 'b', 1) }}", {}, None),
    ("filters_seq", "{{ [3, 1] | first }} {{ 'xyz' | last }} {{ {'k': 1, 'j': 2} | first }} {{ {'k': 1, 'j': 2} | list }} [{{ [] | first }}] {{ [1, 2, 3] | length }} {{ 'héllo' | count }} {{ d | length }}", {"d": {"a": 1}}, None),
    ("filters_numbers", "{{ '12' | int }} {{ ' 7 ' | int }} {{ '1_000' | int }} {{ '3.9' | int }} {{ 'x' | int }} {{ 'x' | int(-1) }} {{ 3.99 | int }} {{ true | int }} {{ '2.5' | float }} {{ 'inf' | float }} {{ 'x' | float }} {{ 3 | float }} {{ -2.5 | abs }}", {}, None),
    ("filters_default", "{{ u | default('a') }} {{ u | d('b') }} {{ none | default('c') }} {{ '' | default('d', true) }} {{ 0 | default('e', boolean=true) }} {{ 'v' | default('f') }}", {}, None),
    ("filters_join_map", "{{ [1, 2, 3] | join }} {{ ['a', 'b'] | join(', ') }} {{ users | map(attribute='name') | join('/') }} {{ users | map(attribute='age', default=0) | list }} {{ users | join(',', attribute='name') }} {{ [1, 'a'] | map('string') | map('upper') | list }}", {"users": [{"name": "ann", "age": 3}, {"name": "bob"}]}, None),
    ("filters_select", "{{ users | selectattr('admin') | map(attribute='name') | list }} {{ users | rejectattr('admin') | map(attribute='name') | list }} {{ users | selectattr('name', 'equalto', 'bob') | list | length }} {{ users | selectattr('admin', 'defined') | list | length }} {{ [1, 2, 3, 4] | select('even') | list }} {{ [1, 2, 3, 4] | reject('gt', 2) | list }} {{ [0, '', 'x', none] | reject | list }}", {"users": [{"name": "ann", "admin": True}, {"name": "bob", "admin": False}, {"name": "cy"}]}, None),
    ("filters_items_reverse", "{{ d | items | list }} {% for k, v in d | items %}{{ k }}{{ v }}{% endfor %} {{ [1, 2] | reverse | list }} {{ 'abc' | reverse }} {{ u | items | list }}", {"d": {"b": 1, "a": 2}}, None),
    ("tojson", "{{ d | tojson }}|{{ d | tojson(indent=2) }}|{{ d | tojson(indent=2, sort_keys=true) }}|{{ d | tojson(separators=(',', ':')) }}|{{ 'ü\"\\n\\u2028\\x01' | tojson }}|{{ 'ü' | tojson(ensure_ascii=true) }}|{{ [] | tojson(indent=4) }}|{{ {} | tojson }}|{{ 1.0 | tojson }}|{{ none | tojson }}|{{ (1, 'a') | tojson }}|{{ {1: 2, none: 3, true: 4, 1.5: 5} | tojson }}|{{ '🙂' | tojson(true) }}|{{ d | tojson(indent='\\t') }}", {"d": {"z": [1, {"y": None}], "a": "é", "n": 1.5, "b": True}}, None),
    ("tests", "{{ none is none }} {{ 1 is number }} {{ 1.5 is number }} {{ true is number }} {{ true is integer }} {{ 1 is integer }} {{ 1.0 is float }} {{ 'x' is string }} {{ [] is iterable }} {{ 'x' is iterable }} {{ {} is iterable }} {{ 1 is iterable }} {{ [] is sequence }} {{ {} is sequence }} {{ {} is mapping }} {{ [] is mapping }} {{ true is true }} {{ 1 is true }} {{ false is false }} {{ 0 is false }} {{ false is boolean }} {{ u is undefined }} {{ 7 is odd }} {{ 7 is even }} {{ 9 is divisibleby 3 }} {{ 9 is divisibleby(4) }}", {}, None),
    ("tests_compare", "{{ 1 is eq 1 }} {{ 1 is equalto 2 }} {{ 1 is ne 2 }} {{ 1 is lt 2 }} {{ 1 is le 1 }} {{ 2 is gt 1 }} {{ 2 is ge 3 }} {{ 'a' is in 'abc' }} {{ 'abc' is lower }} {{ 'ABC' is upper }} {{ '1' is upper }} {{ x is not none }} {{ x is not defined }}", {"x": 1}, None),
    ("dict_literal_order", "{{ {'b': 1, 'a': 2, 'b': 3} }} {{ {'x': 1}.x }} {{ {'nested': {'deep': [1]}}.nested.deep[0] }}", {}, None),
    ("range_forms", "{{ range(3) | list }} {{ range(1, 4) | list }} {{ range(10, 0, -3) | list }} {{ range(0) | list }} {{ range(2, -2) | list }}", {}, None),
    ("raise_exception", "{{ raise_exception('custom failure: ' ~ 42) }}", {}, "custom failure: 42"),
    ("error_undefined_attribute", "{{ u.attr }}", {}, "'u' is undefined"),
    ("error_dict_missing_attribute_chain", "{{ d.missing.deeper }}", {"d": {}}, "'dict object' has no attribute 'missing'"),
    ("error_add_str_int", "{{ 'a' + 1 }}", {}, 'can only concatenate str (not "int") to str'),
    ("error_concat_binds_tighter_than_plus", "{{ 1 ~ 2 + 3 }}", {}, 'can only concatenate str (not "int") to str'),
    ("error_add_int_str", "{{ 1 + 'a' }}", {}, "unsupported operand type(s) for +: 'int' and 'str'"),
    ("error_compare_types", "{{ 1 < 'a' }}", {}, "'<' not supported between instances of 'int' and 'str'"),
    ("error_division_by_zero", "{{ 1 / 0 }}", {}, "division by zero"),
    ("error_call_string", "{{ 'x'() }}", {}, "'str' object is not callable"),
    ("error_unsafe_append", "{% set l = [1] %}{{ l.append(2) }}", {}, "access to attribute 'append' of 'list' object is unsafe."),
    ("error_unsafe_dict_update", "{{ d.update({'a': 1}) }}", {"d": {}}, "access to attribute 'update' of 'dict' object is unsafe."),
    ("error_range_too_big", "{% for i in range(10 ** 9) %}{% endfor %}", {}, "Range too big"),
    ("error_unknown_filter", "{{ 'x' | nosuchfilter }}", {}, "No filter named 'nosuchfilter'."),
    ("error_unknown_test", "{{ 'x' is nosuchtest }}", {}, "No test named 'nosuchtest'."),
    ("error_unknown_tag", "{% frobnicate %}", {}, "Encountered unknown tag 'frobnicate'."),
    ("error_missing_endfor", "{% for x in y %}abc", {}, "Unexpected end of template. Jinja was looking for the following tags: 'endfor' or 'else'."),
    ("error_unpack", "{% for a, b in [[1, 2, 3]] %}{% endfor %}", {}, "too many values to unpack (expected 2)"),
    ("error_tojson_undefined", "{{ u | tojson }}", {}, "Object of type Undefined is not JSON serializable"),
    ("error_length_of_int", "{{ 5 | length }}", {}, "object of type 'int' has no len()"),
    ("error_in_int", "{{ 1 in 5 }}", {}, "argument of type 'int' is not iterable"),
    ("error_set_attr_non_namespace", "{% set d = {} %}{% set d.x = 1 %}", {}, "non-namespace object"),
]


def probe_cases():
    cases = []
    failures = []
    for name, source, context, error_contains in PROBES:
        result = render(source, context)
        case = {"template": name, "source": source, "context": context}
        if error_contains is None:
            if "expected" not in result:
                failures.append(f"probe {name}: unexpected error {result['error']!r}")
                continue
            case["expected"] = result["expected"]
        else:
            if "error" not in result or error_contains not in result["error"]:
                failures.append(f"probe {name}: expected an error containing {error_contains!r}, got {result}")
                continue
            case["error_contains"] = error_contains
        cases.append(case)
    if failures:
        sys.exit("\n".join(failures))
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with goldens.json instead of writing it")
    args = parser.parse_args()
    print(f"transformers {transformers.__version__}, jinja2 {jinja2.__version__}", file=sys.stderr)
    cases = conversation_cases() + probe_cases()
    text = json.dumps(cases, ensure_ascii=False, indent=1) + "\n"
    if args.check:
        if not GOLDENS.exists() or GOLDENS.read_text(encoding="utf-8") != text:
            print(f"{GOLDENS} is stale: rerun {pathlib.Path(__file__).name}", file=sys.stderr)
            return 1
        print(f"{GOLDENS.name}: {len(cases)} cases up to date", file=sys.stderr)
        return 0
    GOLDENS.write_text(text, encoding="utf-8")
    print(f"wrote {len(cases)} cases to {GOLDENS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
