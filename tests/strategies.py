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
