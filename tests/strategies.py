"""Hypothesis strategies for user text: Korean, English, emoji, newlines, braces and template markers."""

from hypothesis import strategies as st

PIECES = ["{input}", "{instruction}", "### 응답:", "### Response:", "{}", "{0}", "\n", "\n\n", " ", "🙂", "😀👍"]

user_text = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8),
        st.text(st.sampled_from(list("가나다라마바사아자차카타파하한국어문장입니다요")), max_size=12),
        st.text(st.sampled_from(list("abcdefghij XYZ.,!?")), max_size=12),
        st.sampled_from(PIECES),
    ),
    max_size=8,
).map("".join)

# conversation turns: user text plus the markers of the chat templates under test (kullm, ChatML, EOS itself)
CHAT_PIECES = ["### 명령어:", "### User:", "### Assistant:", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "\n"]
turn_text = st.lists(st.one_of(user_text, st.sampled_from(CHAT_PIECES)), min_size=1, max_size=3).map("".join).filter(
    str.strip
)


@st.composite
def conversations(draw, min_turns: int = 1, max_turns: int = 8, system=st.none() | turn_text):
    """(role, content) turns: an optional system turn, then 1–8 user/assistant exchanges."""
    n = draw(st.integers(min_turns, max_turns))
    sys_text = draw(system)
    turns = [("system", sys_text)] if sys_text is not None else []
    for _ in range(n):
        turns += [("user", draw(turn_text)), ("assistant", draw(turn_text))]
    return tuple(turns)
