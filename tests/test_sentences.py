"""Sentence splitting of running text in Japanese, Chinese and English, and language detection.

The paragraphs are real prose written for these tests, in encyclopedia and news style.
"""

import pytest

from mlm_dist.data.sentences import SUPPORTED_LANGUAGES, detect_language, split_sentences

JAPANESE = {
    "tokyo": (
        "東京都は日本の首都であり、人口は約1,400万人である。面積は2,194平方キロメートルで、23の特別区と"
        "多摩地域、島しょ部からなる。江戸時代には「江戸」と呼ばれ、1868年に現在の名称に改められた。",
        ["東京都は日本の首都であり、人口は約1,400万人である。",
         "面積は2,194平方キロメートルで、23の特別区と多摩地域、島しょ部からなる。",
         "江戸時代には「江戸」と呼ばれ、1868年に現在の名称に改められた。"]),
    "weather": (
        "気象庁によると、関東地方では明日も晴れる見込みです。最高気温は35.2度に達する予報です！"
        "熱中症に十分注意してください。政府は電気料金の引き下げ幅を３．２９％とする方針を固めた。",
        ["気象庁によると、関東地方では明日も晴れる見込みです。",
         "最高気温は35.2度に達する予報です！",
         "熱中症に十分注意してください。",
         "政府は電気料金の引き下げ幅を３．２９％とする方針を固めた。"]),
    "novel": (
        "『吾輩は猫である』は夏目漱石の長編小説である。1905年から翌年にかけて雑誌『ホトトギス』に連載された。"
        "（なお、題名は冒頭の一文に由来する。）物語は「吾輩は猫である。名前はまだ無い。」という書き出しで始まる。",
        ["『吾輩は猫である』は夏目漱石の長編小説である。",
         "1905年から翌年にかけて雑誌『ホトトギス』に連載された。",
         "（なお、題名は冒頭の一文に由来する。）",
         "物語は「吾輩は猫である。名前はまだ無い。」という書き出しで始まる。"]),
    "interview": (
        "「今日は晴れです。」と彼は言った。記者が「本当ですか？」と尋ねると、彼は笑ってうなずいた。"
        "円周率は何桁まで計算されているのだろうか？2022年には100兆桁に達した！",
        ["「今日は晴れです。」と彼は言った。",
         "記者が「本当ですか？」と尋ねると、彼は笑ってうなずいた。",
         "円周率は何桁まで計算されているのだろうか？",
         "2022年には100兆桁に達した！"]),
}

CHINESE = {
    "beijing": (
        "北京是中华人民共和国的首都，也是全国的政治和文化中心。截至2020年，北京市常住人口约为2,189万人。"
        "1949年10月1日，中华人民共和国在北京宣告成立。",
        ["北京是中华人民共和国的首都，也是全国的政治和文化中心。",
         "截至2020年，北京市常住人口约为2,189万人。",
         "1949年10月1日，中华人民共和国在北京宣告成立。"]),
    "economy": (
        "国家统计局今天发布数据显示，一季度国内生产总值同比增长5.3%。这一增速高于市场预期！"
        "分析人士认为，消费和出口是主要的拉动因素。",
        ["国家统计局今天发布数据显示，一季度国内生产总值同比增长5.3%。",
         "这一增速高于市场预期！",
         "分析人士认为，消费和出口是主要的拉动因素。"]),
    "press": (
        "发言人在记者会上表示：“我们欢迎各方继续对话。”他同时强调，双方应当尊重彼此的核心利益。"
        "记者问：“谈判何时恢复？”发言人没有直接回答。",
        ["发言人在记者会上表示：“我们欢迎各方继续对话。”",
         "他同时强调，双方应当尊重彼此的核心利益。",
         "记者问：“谈判何时恢复？”",
         "发言人没有直接回答。"]),
    "novel": (
        "《红楼梦》是中国古典四大名著之一，作者一般认为是曹雪芹（约1715年—1763年）。全书共120回，"
        "前80回由曹雪芹所作。书中人物超过400个！它为何能流传至今？答案或许在于其细腻的人物描写。",
        ["《红楼梦》是中国古典四大名著之一，作者一般认为是曹雪芹（约1715年—1763年）。",
         "全书共120回，前80回由曹雪芹所作。",
         "书中人物超过400个！",
         "它为何能流传至今？",
         "答案或许在于其细腻的人物描写。"]),
    "traditional": (
        "他說：「我明天去台北。」然後離開了。圓周率約為3.14159，是一個無理數。",
        ["他說：「我明天去台北。」", "然後離開了。", "圓周率約為3.14159，是一個無理數。"]),
}

ENGLISH = {
    "science": (
        "Dr. Jane Smith, a physicist at the U.S. National Institute of Standards and Technology, "
        "led the study. Her team measured the constant to within 3.14 parts per billion. The "
        "result, published on Monday, cost about $1,000,000 to obtain.",
        ["Dr. Jane Smith, a physicist at the U.S. National Institute of Standards and Technology, "
         "led the study.",
         "Her team measured the constant to within 3.14 parts per billion.",
         "The result, published on Monday, cost about $1,000,000 to obtain."]),
    "business": (
        'Mr. Brown said the company would expand, e.g. by opening stores in Washington, D.C. and '
        'Boston. "We are ready." Analysts were skeptical. Is growth sustainable? Few think so!',
        ["Mr. Brown said the company would expand, e.g. by opening stores in Washington, D.C. "
         "and Boston.",
         '"We are ready."', "Analysts were skeptical.", "Is growth sustainable?", "Few think so!"]),
    "history": (
        "Tokyo (Japanese: 東京, Tōkyō) became the capital in 1868. Before that, the city was "
        "known as Edo. It hosted the Summer Olympics in 1964 and again in 2021, i.e. a year after "
        "the planned date.",
        ["Tokyo (Japanese: 東京, Tōkyō) became the capital in 1868.",
         "Before that, the city was known as Edo.",
         "It hosted the Summer Olympics in 1964 and again in 2021, i.e. a year after the planned "
         "date."]),
}

PARAGRAPHS = ([("ja", name, *case) for name, case in JAPANESE.items()]
              + [("zh", name, *case) for name, case in CHINESE.items()]
              + [("en", name, *case) for name, case in ENGLISH.items()])


@pytest.mark.parametrize("lang, name, text, expected", PARAGRAPHS,
                         ids=[f"{lang}-{name}" for lang, name, _, _ in PARAGRAPHS])
def test_paragraphs_split_into_their_sentences(lang, name, text, expected):
    assert split_sentences(text, lang) == expected
    assert split_sentences(text, "auto") == expected  # detected right, split the same
    # Nothing is lost, added or reordered: only whitespace between sentences goes.
    assert "".join("".join(expected).split()) == "".join(text.split())


@pytest.mark.parametrize("lang, text, expected", [
    # A closing quote stays with its sentence; a quote followed by a particle continues it.
    ("ja", "「今日は晴れです。」と彼は言った。", ["「今日は晴れです。」と彼は言った。"]),
    ("ja", "『ついに完成した。』と書かれていた。", ["『ついに完成した。』と書かれていた。"]),
    ("ja", "彼は「行くぞ！」と叫んだ。皆が驚いた。", ["彼は「行くぞ！」と叫んだ。", "皆が驚いた。"]),
    # ... a quote or bracket that ends a sentence and is followed by a new one ends it.
    ("ja", "彼は言った。「明日は雨だ。」それから帰った。",
     ["彼は言った。", "「明日は雨だ。」", "それから帰った。"]),
    ("ja", "（これは注記である。）本文はここから始まる。", ["（これは注記である。）", "本文はここから始まる。"]),
    ("zh", "会议取得成功（详见附件。）。下次会议在上海举行。", ["会议取得成功（详见附件。）。", "下次会议在上海举行。"]),
    ("zh", "他说：“我明天去北京。”", ["他说：“我明天去北京。”"]),
    ("zh", '他说："我明天去北京。"然后离开了。', ['他说："我明天去北京。"', "然后离开了。"]),
    # Stops in a run, half-width and full-width forms.
    ("ja", "本当に？！信じられない。", ["本当に？！", "信じられない。"]),
    ("ja", "結果は良好だった．次の実験に進む．", ["結果は良好だった．", "次の実験に進む．"]),
    ("ja", "これはﾃｽﾄです｡次の文です｡", ["これはﾃｽﾄです｡", "次の文です｡"]),
    # A stop ends a sentence before Latin letters and digits too; dotted Latin words are kept.
    ("ja", "東京は首都である。iPhoneは人気だ。", ["東京は首都である。", "iPhoneは人気だ。"]),
    ("ja", "NHKによると、U.S.の経済は成長した。ASP.NETも使われる。",
     ["NHKによると、U.S.の経済は成長した。", "ASP.NETも使われる。"]),
    ("zh", "他在U.S.工作。2023年回国。", ["他在U.S.工作。", "2023年回国。"]),
    # A stray bracket does not swallow the rest of the paragraph.
    ("ja", "「開いたままの引用。次の文。", ["「開いたままの引用。", "次の文。"]),
    ("en", "The meeting was held in Washington, D.C. on Monday. It ended late.",
     ["The meeting was held in Washington, D.C. on Monday.", "It ended late."]),
    ("en", 'She said, "It is raining." Then she left.',
     ['She said, "It is raining."', "Then she left."]),
    # No space after the period: a dotted name, not a sentence end (sentencex cuts there).
    ("en", "Open it with io.TextIOWrapper. A binascii.Error is raised otherwise.",
     ["Open it with io.TextIOWrapper.", "A binascii.Error is raised otherwise."]),
])
def test_required_cases(lang, text, expected):
    assert split_sentences(text, lang) == expected


@pytest.mark.parametrize("lang, text, expected", [
    # An ASCII . ! ? after Japanese/Chinese text, before a space or more of it, ends a sentence
    # (translated manual pages, web text).
    ("ja", "結果は良好だった.次の実験に進む.", ["結果は良好だった.", "次の実験に進む."]),
    ("ja", "設定は不要です. 詳しくは後述する。", ["設定は不要です.", "詳しくは後述する。"]),
    ("zh", "传送过去.不管服务器是否需要. 版本 1.2 和 a.out 文件。",
     ["传送过去.", "不管服务器是否需要.", "版本 1.2 和 a.out 文件。"]),
    ("zh", "你确定吗?!我不信. 真的!", ["你确定吗?!", "我不信.", "真的!"]),
    ("ja", "本当ですか? ls を使います.", ["本当ですか?", "ls を使います."]),
    ("ja", "見出し（注）.本文はここから.", ["見出し（注）.", "本文はここから."]),
    ("ja", "彼は「終わりです.」それから帰った.", ["彼は「終わりです.」", "それから帰った."]),
    ("ja", "彼は「終わりです.」と言った.", ["彼は「終わりです.」と言った."]),
    ("zh", "这是说明.「注意」不要删除。", ["这是说明.", "「注意」不要删除。"]),
    # ... and nothing else: numbers, versions, file names, URLs, abbreviations, ellipses,
    # a stop followed by Latin text with no space, a stop inside a quote or bracket.
    ("ja", "バージョン1.2.3では3.14倍速い。", ["バージョン1.2.3では3.14倍速い。"]),
    ("ja", "詳細は ls.1 と a.out と設定.conf を見よ。", ["詳細は ls.1 と a.out と設定.conf を見よ。"]),
    ("ja", "ファイル.txtとディレクトリ.dを作る。", ["ファイル.txtとディレクトリ.dを作る。"]),
    ("zh", "请访问 https://例子.中国/索引.html 下载。", ["请访问 https://例子.中国/索引.html 下载。"]),
    ("ja", "U.S.の経済とe.g.の用法、Dr. 山田の説。", ["U.S.の経済とe.g.の用法、Dr. 山田の説。"]),
    ("ja", "引数は file... で指定し、$1, $2, ... $n の順に並ぶ。",
     ["引数は file... で指定し、$1, $2, ... $n の順に並ぶ。"]),
    ("ja", "などなど...次に進む。", ["などなど...次に進む。"]),
    ("ja", "日本語.Pythonで書く。", ["日本語.Pythonで書く。"]),
    ("ja", "「終わりです.次へ.」と書いてある。", ["「終わりです.次へ.」と書いてある。"]),
])
def test_ascii_stops_in_cjk_text(lang, text, expected):
    assert split_sentences(text, lang) == expected


@pytest.mark.parametrize("lang, text, expected", [
    # sentencex (English rules) cuts Japanese/Chinese technical text where no sentence ends.
    ("ja", "ファイル名の最初の `.' までの部分を使う。", ["ファイル名の最初の `.' までの部分を使う。"]),
    ("ja", "find . -name a を実行する。! コマンドも使える。",
     ["find . -name a を実行する。", "! コマンドも使える。"]),
    ("ja", "人物名には .An マクロを使う。#!/bin/sh で始める。",
     ["人物名には .An マクロを使う。", "#!/bin/sh で始める。"]),
    ("ja", "そして ls. によって表示される。", ["そして ls. によって表示される。"]),
    ("zh", "属性：(a) 仅追加、 (c) 压缩、 (d) 不转储。", ["属性：(a) 仅追加、 (c) 压缩、 (d) 不转储。"]),
    # ... and keeps the cuts between Latin-text sentences inside it.
    ("ja", "Read the manual. Then run it. 次に実行する。",
     ["Read the manual.", "Then run it. 次に実行する。"]),
    ("zh", "这是说明。See the manual. It is long. 这是中文。",
     ["这是说明。", "See the manual.", "It is long. 这是中文。"]),
    # An ASCII bracket with a space inside it is a character the text talks about.
    ("ja", "[ の次の文字が ! ならば否定になる。 ] は最初に置く。",
     ["[ の次の文字が ! ならば否定になる。", "] は最初に置く。"]),
    ("ja", "注記がある (一つ目の文。二つ目の文)。次の文。",
     ["注記がある (一つ目の文。二つ目の文)。", "次の文。"]),
    # A particle after a quote continues the sentence, with a space between too (man pages).
    ("ja", "「今日は晴れです。」 と彼は言った。", ["「今日は晴れです。」 と彼は言った。"]),
])
def test_latin_stops_in_cjk_text(lang, text, expected):
    assert split_sentences(text, lang) == expected


def test_lines_are_paragraphs_and_blank_ones_are_dropped():
    text = "  First paragraph. Its second sentence.  \n\n \t \r\n東京は晴れ。大阪は雨。\nLast one"
    for lang in ("en", "ja"):  # English rules know 。 too, Japanese ones know ". "
        assert split_sentences(text, lang) == ["First paragraph.", "Its second sentence.",
                                               "東京は晴れ。", "大阪は雨。", "Last one"]
    assert split_sentences("", "ja") == split_sentences(" \n ", "auto") == []


@pytest.mark.parametrize("expected, text", [
    ("ja", JAPANESE["novel"][0]),
    ("ja", "日本国憲法第九条は戦争の放棄を定めている。"),  # few kana
    ("ja", "PythonのNumPyとPyTorchを使って、行列の計算を高速に行う方法を説明します。"),
    ("zh", CHINESE["beijing"][0]),
    ("zh", CHINESE["traditional"][0]),
    # A Chinese article quoting a Japanese title in kana is still Chinese.
    ("zh", "《となりのトトロ》是宫崎骏编剧并执导的动画电影，1988年在日本上映。影片讲述了两姐妹与森林精灵的故事。"
           "该片获得了日本电影学院奖，并被视为日本动画的代表作之一。"),
    ("en", ENGLISH["science"][0]),
    ("en", ENGLISH["history"][0]),  # English naming 東京 stays English
    ("en", "Ça coûte 3,14 € à Paris."),  # Latin script: English rules
    ("ru", "Москва — столица России. Население города превышает 13 млн человек."),
    ("el", "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας."),
    ("hi", "नई दिल्ली भारत की राजधानी है। यह एक बड़ा शहर है।"),
    ("en", "서울은 대한민국의 수도이다. 인구는 약 940만 명이다."),  # Hangul: no rules of its own
    ("en", "3.14 1,000 -- 42"),
    ("en", ""),
])
def test_detect_language_by_script(expected, text):
    assert detect_language(text) == expected


def test_other_languages_use_their_rules():
    # German abbreviations are German rules' business ("z.B." does not end a sentence).
    assert split_sentences("Das ist z.B. ein Test. Er ist kurz.", "de") == [
        "Das ist z.B. ein Test.", "Er ist kurz."]
    assert split_sentences("नई दिल्ली भारत की राजधानी है। यह एक बड़ा शहर है।", "auto") == [
        "नई दिल्ली भारत की राजधानी है।", "यह एक बड़ा शहर है।"]


def test_language_codes_are_checked():
    assert split_sentences("他说：“好。”然后走了。", "zh-TW") == split_sentences(
        "他说：“好。”然后走了。", "ZH")
    with pytest.raises(ValueError, match=r"unknown language 'xx'.*auto, am, ar, .*en, .*ja, .*zh"):
        split_sentences("Text.", "xx")
    assert {"en", "ja", "zh"} <= set(SUPPORTED_LANGUAGES)
