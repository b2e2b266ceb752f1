"""Texts, chats and templates shared by the data tests (fixtures are in conftest.py)."""

# Text with what tokenizers get wrong: accents, CJK, emoji, digit runs, tabs,
# runs of spaces and newlines, contractions, and special-token look-alikes.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, naïve café: 東京 and 😀 emoji!",
    "Numbers 1234567 and 3.14159; it's, we'll, I'd, you're.",
    "  two spaces\tand a tab\n\nthen   three spaces\n",
    "[INST] <<SYS>> be kind <</SYS>> what is 2 + 2? [/INST] It is 4.",
    "user assistant system: the reply follows.",
]
TEXTS = [
    "Hello world",
    "naïve café 東京 😀 émoji",
    "  leading spaces, then   runs\n\n\nof newlines\t\ttabs  ",
    "1234567 + 89 = 1234656",
    "it's THE 'll 'S we'RE",
    "text with <|eot_id|> and <s> look-alikes </s>",
    "",
]
LLAMA3_TEMPLATE = (  # Meta-Llama-3-Instruct's chat_template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (  # ChatML, with transformers' {% generation %} marks on assistant text
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>\n' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2? Say it  in words."},
    {"role": "assistant", "content": "Four, of course. 😀"},
    {"role": "user", "content": "And naïve 3 + 3?"},
    {"role": "assistant", "content": "Six.\n\nDone."},
]
LLAMA2_TEMPLATE = (  # Llama-2-chat's chat_template
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
