"""The benchmark's deterministic texts: a long ChatML prelude of few-shot stories and short prompts."""

from __future__ import annotations

TOPICS = ["lighthouse keeper", "clockmaker", "beekeeper", "mapmaker", "glassblower", "ferryman",
          "astronomer", "baker", "blacksmith", "gardener", "librarian", "potter", "shepherd",
          "tailor", "violin maker", "weaver", "cartographer", "miller", "fisherman", "candle maker"]
PLACES = ["a windy northern island", "a hill town of red roofs", "a valley full of orchards",
          "a port city at dawn", "a quiet mountain village", "a river delta"]
DETAILS = ["kept a notebook of every small change in the weather", "hummed old songs while working",
           "collected stones shaped like animals", "wrote letters that were never sent",
           "fed a one-eyed cat that visited each evening", "counted the steps to the market every day"]
TURNS = ["One autumn a stranger arrived with a broken compass and a question nobody could answer.",
         "Then a storm came that lasted for three days and cut the roads to the south.",
         "A child from the next street began to visit and asked how everything worked.",
         "A letter came from a cousin who had left for the city twenty years before."]
ENDINGS = ["By spring the whole town knew the story, and told it a little differently each time.",
           "Years later people still left flowers at the door, though nobody remembered why.",
           "The work went on as before, only slower, and with more laughter in it.",
           "And every evening after that, a light burned in the window until late."]
PROMPT_TOPICS = ["bell ringer", "mountain guide", "bookbinder", "tea merchant"]


def story(index: int, topic: str) -> str:
    place = PLACES[index % len(PLACES)]
    return (f"In {place} there lived a {topic} who {DETAILS[index % len(DETAILS)]}. "
            f"The {topic} had learned the trade from an aunt, and worked slowly, with care, "
            f"believing that good work is never in a hurry. {TURNS[index % len(TURNS)]} "
            f"The {topic} listened, thought for a long while, and then did what seemed right: "
            f"to help, to ask for nothing, and to remember. {ENDINGS[index % len(ENDINGS)]}")


def user_turn(topic: str) -> str:
    return f"Write a long story about a {topic}."


def prelude(examples: int) -> str:
    """Instructions plus `examples` few-shot stories, ending where the next user turn's text starts."""
    parts = ["<|im_start|>system\nYou are a storyteller. For every topic, write a long, calm, detailed "
             "story of several sentences in plain English, in the style of the examples.<|im_end|>\n"]
    for i in range(examples):
        topic = TOPICS[i % len(TOPICS)]
        parts.append(f"<|im_start|>user\n{user_turn(topic)}<|im_end|>\n"
                     f"<|im_start|>assistant\n{story(i, topic)}<|im_end|>\n")
    parts.append("<|im_start|>user\n")
    return "".join(parts)


SEASONS = ["winter", "spring", "summer", "autumn"]
SETTINGS = ["near the sea", "in the hills", "in a big city", "on a farm", "by a lake", "in a forest"]
TONES = ["slowly", "quietly", "gently"]


def prompt(index: int, variant: int = 0) -> str:
    """Prompt `index`; variants 1..71 change its season, setting and tone (about the same
    length), so that a benchmark can send each request a prompt no side has seen before."""
    topic = PROMPT_TOPICS[index % len(PROMPT_TOPICS)]
    season = SEASONS[variant % len(SEASONS)]
    setting = SETTINGS[variant // len(SEASONS) % len(SETTINGS)]
    tone = TONES[variant // (len(SEASONS) * len(SETTINGS)) % len(TONES)]
    return (f"{user_turn(topic)} It should take place in {season}, {setting}, and be told "
            f"{tone}.<|im_end|>\n<|im_start|>assistant\n")
