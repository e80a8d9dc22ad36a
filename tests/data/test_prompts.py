import pytest

from lit_llm.data.prompts import TEMPLATES, PromptTemplate, extract_response, format_prompt, response_marker
from lit_llm.errors import ConfigError

# The book's chapter 7 example entry and the prompt its format_input + "\n\n### Response:\n" makes of it.
ENTRY = {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion"}
BOOK_ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nIdentify the correct spelling of the following word."
    "\n\n### Input:\nOcassion"
    "\n\n### Response:\n"
)


def test_alpaca_is_the_books_text():
    assert format_prompt("alpaca", ENTRY["instruction"], ENTRY["input"]) == BOOK_ALPACA


def test_alpaca_leaves_out_an_empty_input():
    text = format_prompt("alpaca", "What is an antonym of 'complicated'?")
    assert text == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWhat is an antonym of 'complicated'?\n\n### Response:\n"
    )
    assert "### Input" not in text


def test_phi3_is_exercise_7_1():
    assert format_prompt("phi3", ENTRY["instruction"], ENTRY["input"]) == (
        "<|user|>\nIdentify the correct spelling of the following word.\nOcassion\n<|assistant|>:\n"
    )
    assert format_prompt("phi3", "Name a color.") == "<|user|>\nName a color.\n<|assistant|>:\n"


def test_user_template_string_keeps_other_braces():
    template = 'Q: {instruction} {"json": 1}\nContext: {input}\nA:'
    assert format_prompt(template, "Add 2 and 2.", "none") == 'Q: Add 2 and 2. {"json": 1}\nContext: none\nA:'
    assert response_marker(template) == "A:"


def test_unknown_template_names_the_choices():
    with pytest.raises(ConfigError, match=r"'vicuna'.*alpaca, phi3.*\{instruction\}"):
        format_prompt("vicuna", "hi")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_extract_response_round_trip(name):
    prompt = format_prompt(name, ENTRY["instruction"], ENTRY["input"])
    generated = prompt + "The correct spelling is 'Occasion.'<|endoftext|>junk after the end"
    assert extract_response(name, generated) == "The correct spelling is 'Occasion.'"
    assert extract_response(name, generated, prompt=prompt) == "The correct spelling is 'Occasion.'"
    # the continuation alone
    assert extract_response(name, "  Occasion.\n<|endoftext|><|endoftext|>") == "Occasion."


def test_extract_response_with_prompt_ignores_a_repeated_header():
    prompt = format_prompt("alpaca", "Say hi.")
    assert extract_response("alpaca", prompt + "Hi.\n\n### Response:\nagain", prompt=prompt).startswith("Hi.")


def test_templates_are_frozen_dataclasses():
    assert isinstance(TEMPLATES["alpaca"], PromptTemplate)
    with pytest.raises(AttributeError):
        TEMPLATES["alpaca"].response = "x"  # type: ignore[misc]


@pytest.mark.parametrize("entry", [ENTRY, {"instruction": "What is an antonym of 'complicated'?", "input": ""}])
def test_format_input_is_the_books_and_format_adds_the_header(entry):
    ch07 = pytest.importorskip("llms_from_scratch.ch07")
    alpaca = TEMPLATES["alpaca"]
    assert alpaca.format_input(entry["instruction"], entry["input"]) == ch07.format_input(entry)
    assert alpaca.format(entry["instruction"], entry["input"]) == ch07.format_input(entry) + "\n\n### Response:\n"
