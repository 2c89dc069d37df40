"""The prompt template and completion-only label masking."""

from ftstudy.prompt import IGNORE_INDEX, build_prompt, clean_generation, tokenize_example, tokenize_prompt


def test_template_matches_the_seeds():
    rec = {"instruction": "Sort.", "input": "3, 1", "response": "1, 3", "history": []}
    assert build_prompt(rec) == "### Instruction:\nSort.\n\n### Input:\n3, 1\n\n### Response:\n"
    assert build_prompt({**rec, "input": ""}) == "### Instruction:\nSort.\n\n### Response:\n"


def test_history_is_rendered_before_the_input():
    rec = {"instruction": "And now?", "input": "", "response": "x",
           "history": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert "### Input:\nUser: Hi\nAssistant: Hello\n\n### Response:\n" in build_prompt(rec)


def test_prompt_tokens_are_masked_and_eos_is_learned(tiny_tokenizer):
    rec = {"instruction": "Reverse the word cat.", "input": "", "response": "tac", "history": []}
    ex = tokenize_example(tiny_tokenizer, rec, max_seq_len=256, max_prompt_tokens=200)
    prompt_len = len(tokenize_prompt(tiny_tokenizer, rec, 200))
    assert ex["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert ex["labels"][prompt_len:] == ex["input_ids"][prompt_len:]
    assert ex["labels"][-1] == tiny_tokenizer.eos_token_id
    assert ex["input_ids"][0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(ex["input_ids"][prompt_len:-1]) == "tac"


def test_truncated_response_gets_no_eos(tiny_tokenizer):
    rec = {"instruction": "Write.", "input": "", "response": "word " * 100, "history": []}
    ex = tokenize_example(tiny_tokenizer, rec, max_seq_len=32, max_prompt_tokens=16)
    assert len(ex["input_ids"]) == 32
    assert tiny_tokenizer.eos_token_id not in ex["labels"]


def test_long_prompt_keeps_bos_and_its_end(tiny_tokenizer):
    rec = {"instruction": "x " * 300 + "final question", "input": "", "response": "y", "history": []}
    ids = tokenize_prompt(tiny_tokenizer, rec, 20)
    assert len(ids) == 20 and ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(ids[1:]).endswith("### Response:\n")


def test_clean_generation_cuts_at_the_next_section():
    assert clean_generation("Paris\n\n### Answer:\nParis") == "Paris"
    assert clean_generation("### Instruction:\nmore") == ""
    assert clean_generation("  a ### b  ") == "a ### b"
