"""export_hf writes a folder that plain transformers loads: same logits, same token ids."""

from __future__ import annotations

import ast
import functools
import json
import re
import textwrap
import unicodedata
from pathlib import Path

import pytest
import torch

from mlm_dist.config import ModelConfig
from mlm_dist.interop.export import export_hf
from mlm_dist.model import BertForPretraining
from mlm_dist.tokenizer import (CLS_ID, MASK_ID, MODEL_FILE, PAD_ID, SEP_ID, UNK_ID, WORD_BOUNDARY,
                                drop_cjk_spaces, train_tokenizer)

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Return a new dictionary, e.g. {'a': 1}; raise ValueError if the key is missing!",
    "  Leading and trailing spaces,   runs of spaces\tand a tab.  ",
    "Café naïve ÉLÈVE — full width ＡＢＣ and the ﬁ ligature.",
    "Unknown scripts 日本語 and emoji 😀😀 become the unknown id.",
    "numbers 3.14159 and 2,718 and 1e-10",
    "",
]


@functools.cache
def docstring_sentences() -> tuple[str, ...]:
    """A few hundred English lines from the docstrings of some stdlib modules."""
    import argparse
    import collections
    import dataclasses
    import json as json_module
    import pathlib

    lines = []
    for module in (argparse, collections, dataclasses, json_module, pathlib, textwrap):
        tree = ast.parse(Path(module.__file__).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node) or ""
                lines += [line.strip() for line in doc.splitlines() if len(line.strip()) > 10]
    return tuple(lines)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(docstring_sentences(), tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                      intermediate_size=128, max_positions=64)
    torch.manual_seed(0)
    model = BertForPretraining(cfg)
    with torch.no_grad():  # move biases and LayerNorms off their init values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path_factory.mktemp("export") / "hf"
    assert export_hf(model.state_dict(), cfg, tokenizer.path.parent, out) == out
    return model.eval(), cfg, out


def test_folder_contents(exported):
    _, _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MODEL_FILE} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and config["hidden_act"] == "gelu"
    assert config["architectures"] == ["BertForPreTraining"]
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert isinstance(transformers.AutoTokenizer.from_pretrained(out), transformers.PreTrainedTokenizerFast)


def test_model_loads_without_missing_weights_and_gives_same_logits(exported, tokenizer):
    model, cfg, out = exported
    hf, info = transformers.BertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    assert hf.cls.predictions.decoder.weight is hf.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(hf.cls.predictions.decoder.bias, model.mlm_head.decoder.bias, rtol=0, atol=0)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = hf_tok(["A short one.", SENTENCES[0], "Café naïve"], ["b", SENTENCES[1][:40], "naïve ÉLÈVE"],
                 padding=True, return_tensors="pt")
    assert enc["attention_mask"].min() == 0  # the batch really has padding
    with torch.no_grad():
        mlm_logits, nsp_logits = model(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
        ref = hf(**enc)
    assert (mlm_logits - ref.prediction_logits).abs().max() < 1e-4
    assert (nsp_logits - ref.seq_relationship_logits).abs().max() < 1e-4


def test_tokenizer_gives_our_ids(exported, tokenizer):
    _, _, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    # Runs of one repeated character can tie exactly; see the test below.
    extra = [line for line in docstring_sentences()[::10] if not re.search(r"(.)\1\1", line)]
    assert len(extra) > 50
    for text in SENTENCES + extra:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text), text
        assert hf_tok(text)["input_ids"] == [CLS_ID] + tokenizer.encode(text) + [SEP_ID], text
    assert tokenizer.encode(SENTENCES[4]).count(UNK_ID) > 0  # the unknown-character path is covered
    assert hf_tok.decode(hf_tok(SENTENCES[0])["input_ids"], skip_special_tokens=True) == \
        tokenizer.decode(tokenizer.encode(SENTENCES[0]))


def test_tokenizer_differs_only_in_the_order_of_tied_pieces(exported, tokenizer):
    """Known difference: when two segmentations score exactly the same, e.g. ">>>" as ">" ">>"
    or ">>" ">", SentencePiece's float32 Viterbi and the tokenizers library's pick different
    ones, and SentencePiece's choice even depends on the preceding text through rounding.
    That only happens in runs of one repeated character and only reorders equal pieces."""
    _, _, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in docstring_sentences():
        ours, theirs = tokenizer.encode(text), hf_tok(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            assert sorted(ours) == sorted(theirs), text
            assert re.search(r"(.)\1\1", text), text


def test_tokenizer_special_tokens_and_pair_layout(exported, tokenizer):
    _, cfg, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.pad_token_id, hf_tok.unk_token_id, hf_tok.cls_token_id, hf_tok.sep_token_id,
            hf_tok.mask_token_id) == (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)
    assert hf_tok.model_max_length == cfg.max_positions

    a, b = "the first sentence.", "and the second one"
    enc = hf_tok(a, b)
    ids_a, ids_b = tokenizer.encode(a), tokenizer.encode(b)
    assert enc["input_ids"] == [CLS_ID] + ids_a + [SEP_ID] + ids_b + [SEP_ID]
    assert enc["token_type_ids"] == [0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])

    for text in ("the [MASK] of the list.", "[MASK][MASK] x[MASK]y", "Return [MASK]"):
        expected = [CLS_ID] + tokenizer.encode(text, parse_mask=True) + [SEP_ID]
        assert hf_tok(text)["input_ids"] == expected, text

    padded = hf_tok(["short", "a somewhat longer sentence here"], padding=True)
    assert padded["input_ids"][0][-1] == PAD_ID and padded["attention_mask"][0][-1] == 0


MASKED = [
    "[MASK] starts the sentence.", "the [MASK] of the list.", "Return the [MASK]",
    "Return the [MASK].", "the end, the [MASK], the rest", "a w[MASK]rd", "[MASK][MASK] x[MASK]y",
    "  spaces  [MASK]  around  [MASK]  ", "tab\t[MASK]\tand [MASK]\u200bzero width", "[MASK]",
]


def test_tokenizer_mask_in_text_gives_our_ids(exported, tokenizer):
    """[MASK] typed in the text: the same ids as Tokenizer.encode(parse_mask=True), where the
    text around a [MASK] tokenizes as around a real word ("[MASK]." is [MASK] ".")."""
    _, _, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = MASKED + [re.sub(r"\w+", "[MASK]", line, count=1) for line in docstring_sentences()[::5]
                      if not re.search(r"(.)\1\1", line)]  # ties, as in the test above
    for text in texts:
        ours = tokenizer.encode(text, parse_mask=True)
        assert hf_tok(text)["input_ids"] == [CLS_ID] + ours + [SEP_ID], text
    dot = tokenizer.sp.piece_to_id(".")
    assert tokenizer.encode("the list.")[-1] == dot  # as "▁list" ".", so "[MASK]" "."
    assert hf_tok("the [MASK].", add_special_tokens=False)["input_ids"] == \
        tokenizer.encode("the") + [MASK_ID, dot]


def test_tokenizer_mask_in_text_without_spaces(tmp_path):
    from mlm_dist.interop.hf_tokenizer import hf_tokenizer

    sentences = ["東京は日本の首都です。", "日本の首都は東京です。", "北京是中国的首都。",
                 "中国的首都是北京。"]
    ours = train_tokenizer(sentences * 10, tmp_path, vocab_size=25)
    hf_tok = hf_tokenizer(tmp_path, model_max_length=64)
    for text in ("東京は[MASK]の首都です。", "[MASK]是中国的首都。", "中国的首都是[MASK]",
                 "東京は日本の首都です。"):
        ids = hf_tok(text)["input_ids"]
        assert ids == [CLS_ID] + ours.encode(text, parse_mask=True) + [SEP_ID], text
    tokens = hf_tok.tokenize("東京は[MASK]の首都です。")
    assert tokens[tokens.index("[MASK]") + 1] == "の"  # the word goes on: no "▁" in front


def test_fill_mask_pipeline_agrees_with_ours(exported, tokenizer):
    from mlm_dist.interop.fill_mask import fill_mask

    model, _, out = exported
    text = "Return the [MASK] of the list [MASK]."
    theirs = transformers.pipeline("fill-mask", model=str(out), top_k=5)(text)
    for ours, hf in zip(fill_mask(model, tokenizer, text, top_k=5), theirs, strict=True):
        assert [p["token"] for p in ours] == [tokenizer.id_to_piece(p["token"]) for p in hf]
        assert max(abs(p["prob"] - q["score"]) for p, q in zip(ours, hf)) < 1e-3


def test_special_token_strings_in_text_differ_from_ours_as_documented(exported, tokenizer):
    """Known difference: like every transformers tokenizer, the export turns a literal "[SEP]"
    (or [CLS]/[PAD]/[UNK]) in the text into that special id, whereas our Tokenizer.encode never
    produces control ids from text. Ordinary text does not contain these strings."""
    _, _, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "one [SEP] two"
    assert SEP_ID not in tokenizer.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == \
        tokenizer.encode("one") + [SEP_ID] + tokenizer.encode("two")


def test_refuses_non_empty_out_dir_and_leaves_it_alone(exported, tokenizer, tmp_path):
    model, cfg, _ = exported
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_hf(model.state_dict(), cfg, tokenizer.path.parent, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]

    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty folder is fine
    export_hf(model.state_dict(), cfg, tokenizer.path.parent, empty)
    assert (empty / "model.safetensors").is_file()


def test_refuses_tokenizer_of_another_vocab_size(exported, tokenizer, tmp_path):
    model, cfg, _ = exported
    wrong = ModelConfig(**{**cfg.__dict__, "vocab_size": cfg.vocab_size + 1})
    with pytest.raises(ValueError, match="vocab_size"):
        export_hf(model.state_dict(), wrong, tokenizer.path.parent, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_bpe_tokenizer_exports_too(tmp_path):
    from mlm_dist.interop.hf_tokenizer import hf_tokenizer

    bpe = train_tokenizer(docstring_sentences(), tmp_path, vocab_size=400, model_type="bpe")
    hf_tok = hf_tokenizer(tmp_path, model_max_length=64)
    for text in SENTENCES + list(docstring_sentences()[::10]):
        assert hf_tok(text)["input_ids"] == [CLS_ID] + bpe.encode(text) + [SEP_ID], text


# ----------------------------------------------------------------------------- Japanese, Chinese

JAPANESE = [
    "東京は日本の首都で、世界でも有数の大都市です。",
    "京都には千年以上の歴史を持つ寺や神社がたくさんあります。",
    "私は毎朝七時に起きて、駅まで歩いて行きます。",
    "昨日の夜は雨が強く降っていたので、家で本を読みました。",
    "富士山は日本で一番高い山で、天気の良い日には東京からも見えます。",
    "この店のラーメンはとてもおいしいと評判です。",
    "日本語の文章には、ひらがなとカタカナと漢字が混ざっています。",
    "新しいパソコンを買ったので、古いデータを移さなければなりません。",
    "週末は友達と一緒に海へ行く予定です。",
    "電車が遅れたため、会議に十分ほど遅刻してしまいました。",
    "春になると、公園の桜が一斉に咲き始めます。",
    "彼女は大学で経済学を勉強しています。",
    "このファイルを開くには、管理者の権限が必要です。",
    "コマンドを実行すると、結果が画面に表示されます。",
    "図書館では静かにしなければなりません。",
    "夏の夜には、各地で花火大会が開かれます。",
    "母が作ってくれたカレーは、世界で一番おいしいと思います。",
    "北海道の冬はとても寒く、雪がたくさん降ります。",
    "明日の天気予報によると、午後から晴れるそうです。",
    "子どもたちは川で魚を捕まえて遊んでいました。",
    "会社の近くに新しい喫茶店ができました。",
    "設定を変更した後は、必ずシステムを再起動してください。",
    "日本の人口は約一億二千万人です。",
    "駅前の本屋で、好きな作家の新しい小説を見つけました。",
    "祖父は若い頃、船乗りとして世界中を旅しました。",
    "大阪の人は話し好きで、冗談が上手だと言われています。",
    "このプログラムは、入力された文字列を単語に分割します。",
    "秋には山の木々が赤や黄色に色づきます。",
    "お茶を飲みながら、窓の外の景色を眺めていました。",
    "試験の前の日は、遅くまで図書館で勉強しました。",
    "沖縄の海は透明で、たくさんの魚が泳いでいます。",
    "インターネットのおかげで、遠くに住む家族とも簡単に話せます。",
]
CHINESE = [
    "北京是中国的首都，也是一座历史悠久的城市。",
    "上海是中国最大的城市之一，经济非常发达。",
    "我每天早上七点起床，然后去公园跑步。",
    "昨天晚上下了一场大雨，街上到处都是积水。",
    "长城是世界上最著名的古代建筑之一。",
    "这家饭馆的饺子很好吃，价格也不贵。",
    "汉字是世界上使用人数最多的文字之一。",
    "我买了一台新电脑，需要把旧的数据复制过去。",
    "周末我打算和朋友一起去爬山。",
    "因为地铁出了故障，我上班迟到了二十分钟。",
    "春天来了，公园里的花都开了。",
    "她在大学里学习计算机科学。",
    "打开这个文件需要管理员的权限。",
    "运行这个命令以后，结果会显示在屏幕上。",
    "在图书馆里要保持安静。",
    "中秋节的时候，家家户户都会吃月饼。",
    "妈妈做的红烧肉是世界上最好吃的菜。",
    "哈尔滨的冬天非常冷，到处都是冰雪。",
    "天气预报说明天下午会转晴。",
    "孩子们在河边捉鱼，玩得非常开心。",
    "公司附近新开了一家咖啡馆。",
    "修改配置以后，请务必重新启动系统。",
    "中国的人口超过十四亿。",
    "我在书店里找到了我最喜欢的作家的新小说。",
    "爷爷年轻的时候当过水手，去过很多国家。",
    "四川菜以麻辣著称，很多人都喜欢吃火锅。",
    "这个程序可以把输入的句子分成词语。",
    "秋天到了，山上的树叶变成了红色和黄色。",
    "我一边喝茶，一边看着窗外的风景。",
    "考试前一天，我在图书馆学习到很晚。",
    "西湖的风景非常美丽，每年都有很多游客。",
    "有了互联网，我们可以很方便地和远方的家人聊天。",
]
# Text the tokenizers never saw: rare and non-BMP ideographs, emoji (with a skin tone, joined
# by zero-width joiners), another script, and forms NFKC rewrites (half-width katakana and its
# sound marks, full-width Latin and digits, ㍿ ㈱ ① ㌔, the ideographic space, a combining mark).
UNSEEN = [
    "鬱蒼とした森の奥で、麒麟を見たという噂がある。", "𠮷野家の牛丼は安くておいしい。",
    "今日はいい天気ですね😀👍🏽", "家族👨‍👩‍👧で旅行に行きました。", "ｶﾀｶﾅとﾊﾟｿｺﾝとｶﾞｷﾞｸﾞ",
    "ＡＢＣ１２３は全角の英数字です。", "㍿と㈱と①と㌔は互換文字です。", "全角　スペース　です。",
    "か\u3099とは\u309aの結合文字", "한국어와 日本語が混ざった文。", "東京 大阪  京都\t名古屋",
    "  前後に空白がある文。  ", "「かぎかっこ」や『二重かぎかっこ』も使います！？", "値段は¥1,000です。",
    "龘靐齉齾爩麤是很少见的汉字。", "臺灣的繁體字與簡體字不同。", "𪚥是一个很少见的汉字😀。",
    "中文 English 混合 text, 还有 emoji 🎉!", "数学符号：∑∫√ 和 ①②③", "半角标点,句号.问号?",
    "ﾊﾝｶｸ", "😀", " ", "",
]
# Latin words, options and numbers inside Japanese/Chinese text, with the spaces translated
# manual pages put around them (and without), seen in training and not.
MIXED = ["引き数 file の Macintosh タイプを変更する。", "ls -l コマンドでファイルの一覧を表示する。",
         "GNU General Public License の下で配布される。", "Linuxのカーネルは 2023 年に更新された。",
         "使用 Linux 系统 的 GNU 工具。", "运行 ls -l 命令可以显示文件。"]
UNSEEN += ["このファイルは  -v  オプションで 詳しく表示する。", "Linux カーネル 6.1 と gcc 12",
           "東京\u3000 大阪", "x 東京 y", " file", "ls", "ls -l", "这是 Python 3.12 的 新 功能。"]
MASKED = ["東京は日本の[MASK]です。", "北京是中国的[MASK]。", "[MASK]は日本の首都です。",
          "我每天早上[MASK]点起床", "[MASK]😀[MASK]", "東京 [MASK] 大阪", "ファイル [MASK] を表示",
          "[MASK] file の", "ls [MASK] -l", "  東京 [MASK]  file", "Linux[MASK]の", " [MASK] ",
          "  ls [MASK]", "[MASK]  使用 Linux"]


def train_small(sentences, out, byte_fallback, model_type="unigram", lang="en"):
    """A tokenizer at the largest vocabulary these few sentences support (SentencePiece names it)."""
    size = 5000
    try:
        return train_tokenizer(sentences, out, vocab_size=size, byte_fallback=byte_fallback,
                               character_coverage=0.98, model_type=model_type, lang=lang)
    except ValueError as e:
        size = int(re.search(r"at most (\d+) pieces", str(e)).group(1))
    return train_tokenizer(sentences, out, vocab_size=size, byte_fallback=byte_fallback,
                           character_coverage=0.98, model_type=model_type, lang=lang)


@pytest.fixture(scope="module", params=[("ja", False, "en"), ("ja", True, "en"), ("zh", False, "en"),
                                        ("zh", True, "en"), ("ja", "bpe", "en"),
                                        ("ja", False, "ja"), ("ja", True, "ja"), ("zh", True, "zh"),
                                        ("ja", "bpe", "ja")],
                ids=["ja", "ja-bytes", "zh", "zh-bytes", "ja-bpe-bytes", "ja-lang", "ja-bytes-lang",
                     "zh-bytes-lang", "ja-bpe-bytes-lang"])
def cjk(request, tmp_path_factory):
    """(ours, the exported tokenizer loaded by AutoTokenizer, training sentences). "-lang":
    trained with lang="ja" / "zh" (no dummy prefix, spaces next to CJK characters dropped)."""
    from mlm_dist.interop.hf_tokenizer import hf_tokenizer

    lang, option, tokenizer_lang = request.param
    sentences = (JAPANESE if lang == "ja" else CHINESE) + MIXED
    directory = tmp_path_factory.mktemp(f"{lang}-{option}-{tokenizer_lang}")
    ours = train_small(sentences, directory / "tok", byte_fallback=bool(option),
                       model_type="bpe" if option == "bpe" else "unigram", lang=tokenizer_lang)
    assert ours.cjk == (tokenizer_lang != "en")
    hf_tokenizer(directory / "tok", model_max_length=128).save_pretrained(directory / "hf")
    return ours, transformers.AutoTokenizer.from_pretrained(directory / "hf"), sentences


def test_cjk_tokenizer_gives_our_ids(cjk):
    ours, hf_tok, sentences = cjk
    byte_fallback = ours.sp.is_byte(5)
    texts = sentences + UNSEEN + JAPANESE[::3] + CHINESE[::3] + ["".join(sentences[:6])]
    unknown = 0
    for text in texts:
        ids = ours.encode(text)
        assert hf_tok(text)["input_ids"] == [CLS_ID] + ids + [SEP_ID], text
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, text
        unknown += sum(ours.sp.is_byte(i) if byte_fallback else i == UNK_ID for i in ids)
        decoded = hf_tok.decode(hf_tok(text)["input_ids"], skip_special_tokens=True)
        if byte_fallback:  # nothing is lost: the text comes back as SentencePiece normalised it
            assert UNK_ID not in ids
            assert decoded == ours.decode(ids), text
            read = drop_cjk_spaces(text) if ours.cjk else text  # what SentencePiece reads
            assert decoded == ours.sp.normalize(read).replace(WORD_BOUNDARY, " ").lstrip(" ")
        else:
            # Known difference: a text that starts with an unknown word ("▁" [UNK] "▁" …)
            # decodes with a leading space, as the Metaspace decoder removes only the first
            # "▁" and SentencePiece every leading one.
            assert decoded.lstrip(" ") == ours.decode(ids), text
            assert decoded == ours.decode(ids) or ids[:2] == [ours.sp.piece_to_id(WORD_BOUNDARY), UNK_ID]
    assert unknown > 100  # the unseen-character path is well covered


def test_cjk_pairs_and_masks_give_our_ids(cjk):
    ours, hf_tok, sentences = cjk
    a, b = sentences[0], UNSEEN[2]
    enc = hf_tok(a, b)
    assert enc["input_ids"] == [CLS_ID] + ours.encode(a) + [SEP_ID] + ours.encode(b) + [SEP_ID]
    for text in MASKED + [s.replace(s[3:5], "[MASK]", 1) for s in sentences[::4]]:
        expected = [CLS_ID] + ours.encode(text, parse_mask=True) + [SEP_ID]
        assert hf_tok(text)["input_ids"] == expected, text


def test_byte_pieces_typed_as_text(tmp_path):
    """Text that spells a byte piece ("<0x41>") is those characters, never the byte, in
    SentencePiece and in the export alike, as long as the characters have pieces. Known
    difference: if one of them has none, the export takes the byte piece (hf_export docstring)."""
    from mlm_dist.interop.hf_tokenizer import hf_tokenizer

    sentences = JAPANESE + ["値は 0x41 と 0xE3 で <タグ> を使う。", "012345678 ABCDEF x <> です。"]
    ours = train_small(sentences, tmp_path, byte_fallback=True)
    hf_tok = hf_tokenizer(tmp_path, model_max_length=64)
    for text in ("<0x41>", "値は<0x41><0xE3>です", "x <0xFF> y"):
        ids = ours.encode(text)
        assert not any(ours.sp.is_byte(i) for i in ids[:3]), text
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, text
    text = "<0x9A>"  # "9" never occurs in the training text: no piece of its own
    byte = 5  # the id of <0x00>
    assert byte + ord("9") in ours.encode(text) and byte + 0x9A not in ours.encode(text)
    assert byte + 0x9A in hf_tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("lang,tokenizer_lang", [("ja", "en"), ("zh", "en"), ("ja", "ja"),
                                                 ("zh", "zh")])
def test_cjk_export_works_in_the_fill_mask_pipeline(lang, tokenizer_lang, tmp_path):
    """An exported Japanese / Chinese model (byte fallback on) answers transformers'
    fill-mask pipeline, with our tokens and probabilities; with a tokenizer trained for the
    language, the filled-in sentence reads as written, with no space anywhere."""
    from mlm_dist.interop.fill_mask import fill_mask

    sentences, text = ((JAPANESE, "東京は日本の[MASK]です。") if lang == "ja" else
                       (CHINESE, "北京是中国的[MASK]。"))
    tok = train_small(sentences, tmp_path / "tok", byte_fallback=True, lang=tokenizer_lang)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                      intermediate_size=64, max_positions=64)
    torch.manual_seed(0)
    model = BertForPretraining(cfg).eval()
    export_hf(model.state_dict(), cfg, tok.path.parent, tmp_path / "hf")

    predictions = transformers.pipeline("fill-mask", model=str(tmp_path / "hf"), top_k=5)(text)
    assert len(predictions) == 5
    for p in predictions:
        assert p["sequence"].replace(" ", "").startswith(text.split("[MASK]")[0])
        assert "[MASK]" not in p["sequence"]
        if tok.cjk:  # its vocabulary has no "▁" at all: the text it learnt has no space
            assert p["sequence"] == text.replace("[MASK]", p["token_str"]), p
    assert tok.cjk == (tok.sp.piece_to_id(WORD_BOUNDARY) == UNK_ID)
    ours = fill_mask(model, tok, text, top_k=5)[0]
    assert [p["token"] for p in ours] == [tok.id_to_piece(p["token"]) for p in predictions]
    assert max(abs(p["prob"] - q["score"]) for p, q in zip(ours, predictions)) < 1e-3


def cjk_normalisation_cases():
    """Every character of the CJK blocks that NFKC touches (punctuation, kana, half- and
    full-width forms, enclosed and compatibility characters, Kangxi radicals), each kana with
    each sound mark, and the texts above in decomposed forms (macOS writes NFD file names)."""
    blocks = [(0x2460, 0x24FF), (0x2E80, 0x2FDF), (0x3000, 0x33FF), (0xF900, 0xFAFF),
              (0xFE30, 0xFE4F), (0xFF00, 0xFFEF)]
    cases = ["日本" + chr(c) + "です" for lo, hi in blocks for c in range(lo, hi + 1)]
    kana = [chr(c) for c in (*range(0x3041, 0x3097), *range(0x30A1, 0x30FB), *range(0xFF66, 0xFF9E))]
    cases += [k + mark for k in kana for mark in "\u3099\u309a\uff9e\uff9f\u309b\u309c"]
    cases += [unicodedata.normalize(form, text) for form in ("NFD", "NFKD")
              for text in JAPANESE + CHINESE + UNSEEN]
    return cases


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_cjk_normalisation_gives_our_ids(tmp_path, lang):
    """The exported normaliser against SentencePiece's, character by character. With byte
    fallback every character that ends up different would show as different bytes (with [UNK]
    two different unknown characters look alike)."""
    from mlm_dist.interop.hf_tokenizer import hf_tokenizer

    ours = train_small(JAPANESE + CHINESE + MIXED, tmp_path, byte_fallback=True, lang=lang)
    hf_tok = hf_tokenizer(tmp_path, model_max_length=64)
    cases = cjk_normalisation_cases()
    assert len(cases) > 3000
    differ = [text for text in cases
              if hf_tok(text, add_special_tokens=False)["input_ids"] != ours.encode(text)]
    assert not differ, [(t, [hex(ord(c)) for c in t]) for t in differ[:10]]
    # e.g. half-width "ｶﾞ" and decomposed "か" U+3099 are one character, as in SentencePiece
    assert hf_tok.tokenize("ｶﾞ")[1:] == hf_tok.tokenize("ガ")[1:] == [
        ours.id_to_piece(i) for i in ours.encode("ガ")][1:]
