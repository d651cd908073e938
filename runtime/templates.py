"""Every family's chat template, as data (declared once; exporters copy one into the manifest).

Keys (runtime/template.py renders them):
  system        text before the first turn (the system prompt's KV is computed once)
  user          a user turn, "{content}" = its media wraps + question
  assistant     the cue after which the model answers (also opens each past answer)
  answer        how a past answer is written back into the history, "{answer}"
  media         modality -> wrap around the placeholder (the rows replace the placeholder)
  media_sep     between a turn's media and its question
  media_join    between two media of one turn (BuboGPT: each medium is its own message)
  placeholder   the string the rows replace
  bos           BOS before the first text segment
  stop          strings that end an answer (besides EOS)
  special       strings of the template's own markup that are single tokens of the LLM's
                vocabulary (resolved to ids at export: {text: id} in the manifest); user
                text is never parsed for them
  media_order   the order of a turn's media, whatever order they were given in (LEGO)
  ground_prompt the family's own prompt for grounded answers (LEGO's demo), for UIs
  special_strip drop the whitespace on both sides of every special token (Emu's tokenizer)
  system_media  modality -> the system text used when the first turn holds that medium
  min_new_tokens EOS is banned until this many tokens are out (Emu: generate(min_length=1))
  bos           may also be "first": BOS before everything (the HF tokenizer's own)
"""
from __future__ import annotations

# MiniGPT-4 with Vicuna v0 (conversation.py CONV_VISION_Vicuna0, sep "###", roles "Human: " /
# "Assistant: ", get_prompt: system + sep + role + message + sep ..., the open turn ends with the
# bare role): system + "###Human: <Img><ImageHere></Img> {q}###Assistant: ". The trailing space
# after "Assistant:" is the current repo's (and stage-2 training's prompt_template
# '###Human: {} ###Assistant: '). The 32 rows replace <ImageHere>; BOS only before the first
# segment; generation stops at "###" (ids 835 or 2277 29937).
MINIGPT4_SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the "
                   "image once I provide it to you. Please answer my questions.")
MINIGPT4 = {
    "system": MINIGPT4_SYSTEM,
    "user": "###Human: {content}",
    "assistant": "###Assistant: ",
    "answer": "{answer}",
    "media": {"image": "<Img><ImageHere></Img>"},
    "media_sep": " ",                 # Chat.ask: "<Img><ImageHere></Img>" + " " + question
    "placeholder": "<ImageHere>",
    "bos": True,
    "stop": ["###"],
}
# MiniGPT-4 with LLaMA-2-chat (CONV_VISION_LLama2: roles "<s>[INST] " / " [/INST] ", sep ""):
# system + "<s>[INST] <Img><ImageHere></Img> {q} [/INST] " + answer + "<s>[INST] ...". The system
# text stays before the first "<s>" as the original writes it; "<s>" in the prompt is the BOS
# token (the tokenizer splits it out); answers end at EOS (</s>) or "###" (demo.py's stops).
MINIGPT4_LLAMA2 = {
    "system": MINIGPT4_SYSTEM,
    "user": "<s>[INST] {content}",
    "assistant": " [/INST] ",
    "answer": "{answer}",
    "media": {"image": "<Img><ImageHere></Img>"},
    "media_sep": " ",
    "placeholder": "<ImageHere>",
    "bos": True,
    "stop": ["###"],
    "special": ["<s>"],
}
# InstructBLIP: the original takes one instruction and answers it: [rows][BOS]{prompt}, stop at
# EOS. Later turns (scops' extension; the original has none) append " {answer}\n{question}"; the
# image rows stay conditioned on the question they came with, so earlier turns stay cached.
INSTRUCTBLIP = {
    "system": "",
    "user": "{content}",
    "assistant": "",
    "answer": " {answer}\n",
    "media": {"image": "<ImageHere>"},
    "media_sep": "",
    "placeholder": "<ImageHere>",
    "bos": True,
    "stop": [],
}
# PandaGPT (code/model/openllama.py): BOS + "### Human: <Img>" + row + "</Img> " + prompt +
# "\n### Assistant:"; web_demo.py continues with " {answer}\n### Human: {q}\n### Assistant:";
# stop at "##" (id 2277). The history's answer is decode(output_ids[:-2]): for an answer that
# ends "\n##" exactly the text before it; for one cut by length or EOS, two tokens fewer.
PANDAGPT = {
    "system": "",
    "user": "### Human: {content}",
    "assistant": "\n### Assistant:",
    "answer": " {answer}\n",
    "media": {m: "<Img><ImageHere></Img>" for m in ("mix", "image", "audio", "video", "thermal", "depth", "imu")},
    "media_sep": " ",
    "placeholder": "<ImageHere>",
    "bos": True,
    "stop": ["##"],
    "history_drop": 2,
}
# BuboGPT (eval_scripts/conversation.py CONV_X + Conversation.get_prompt, sep "###"): system +
# "###Human: " + content + "###Assistant:"; an uploaded medium is its own Human message and the
# question is joined to the LAST one with a space (Chat.ask, just_uploaded); app.py uploads
# image, then audio.
BUBOGPT_SYSTEM = ("Give the following image: <Vision>ImageContent</Vision> or audio: <Audio>AudioContent</Audio>. "
                  "You will be able to see the image/audio once I provide it to you. Please answer my questions.")
BUBOGPT = {
    "system": BUBOGPT_SYSTEM,
    "user": "###Human: {content}",
    "assistant": "###Assistant:",
    "answer": " {answer}",
    "media": {"image": "<Vision><ModalityHere></Vision>", "audio": "<Audio><ModalityHere></Audio>"},
    "media_sep": " ",
    "media_join": "###Human: ",       # between two media of one turn (each was its own message)
    "placeholder": "<ModalityHere>",
    "bos": True,                      # get_context_emb: add_special_tokens only on the first segment
    "stop": ["###"],                  # stop ids [835] / [2277, 29937]
}
# LEGO / GroundingGPT (lego/conversation.py conv_lego, SeparatorStyle.SINGLE, sep "###"): system
# + "###Human: " + content + "###Assistant:". gradio_web_server.py prepends to the question, each
# followed by "\n", the image block, then the video block, then the sound block: the turn reads
# sound, video, image, question. The rows take the places of the <*_patch> tokens; the
# start/end tokens are added tokens (ids 32001-32008 after <im_patch> 32000). Stop at "###".
LEGO_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LEGO = {
    "system": LEGO_SYSTEM,
    "user": "###Human: {content}",
    "assistant": "###Assistant:",
    "answer": " {answer}",
    "media": {"audio": "<so_start><ModalityHere><so_end>\n", "video": "<vi_start><ModalityHere><vi_end>\n",
              "image": "<im_start><ModalityHere><im_end>\n"},
    "media_order": ["audio", "video", "image"],
    "media_sep": "",                  # each block ends with "\n"; the question follows it
    "placeholder": "<ModalityHere>",
    "special": ["<im_start>", "<im_end>", "<vi_start>", "<vi_end>", "<so_start>", "<so_end>"],
    "bos": True,
    "stop": ["###"],
    "ground_prompt": "Please describe the image and include the object positions in [x0, y0, x1, y1] format.",
}

# Emu-I (Emu1/inference.py): f"{system} [USER]: {text} [ASSISTANT]:" with text = image_placeholder +
# question ("[IMG]" + 32 x "<image>" + "[/IMG]", no space before the question) and the image (or
# video) system message; later turns as mm_eval/datasets/visdial.py writes them: " [USER]: {q}
# [ASSISTANT]: {a}</s>". The authors' transformers (4.29-4.33) dropped the whitespace on both
# sides of every added token and encoded each chunk between them on its own (special_strip);
# Emu.generate passes min_length=1 (EOS banned at the first new token); stop at EOS.
EMU_IMAGE_SYSTEM = ("You will be presented with an image: [IMG]ImageContent[/IMG]. You will be able to see the "
                    "image after I provide it to you. Please answer my questions based on the given image.")
EMU_VIDEO_SYSTEM = ("You are a helpful assistant and you will be presented with a video consisting of multiple "
                    "chronological images: [IMG]ImageContent[/IMG]. You will be able to see the video after I "
                    "provide it to you. Please answer my questions based on the given video.")
_EMU_COMMON = {
    "media": {"image": "[IMG]<ImageHere>[/IMG]", "video": "[IMG]<ImageHere>[/IMG]"},   # video: one per frame
    "media_sep": "",
    "placeholder": "<ImageHere>",
    "bos": "first",
    "stop": [],
    "special_strip": True,
    "min_new_tokens": 1,
}
EMU_I = {**_EMU_COMMON, "system": EMU_IMAGE_SYSTEM, "system_media": {"video": EMU_VIDEO_SYSTEM},
         "user": " [USER]: {content}", "assistant": " [ASSISTANT]:", "answer": " {answer}</s>",
         "special": ["[IMG]", "[/IMG]", "[USER]", "[ASSISTANT]", "</s>"]}
# The pretrained Emu continues interleaved text (inference.py with instruct=False: prompt = text).
EMU = {**_EMU_COMMON, "system": "", "user": "{content}", "assistant": "", "answer": "{answer}",
       "special": ["[IMG]", "[/IMG]", "</s>"]}
