"""Benchmark of the jieba segmentation stage: one process vs the Ray Data stage on 2 CPUs.

    python bench/preprocess.py            # 30 MB corpus (and a 120 MB one for memory)
    python bench/preprocess.py --quick    # 3 MB: a smoke run that proves the script works

In one run it
1. generates a deterministic Chinese dialogue corpus (templates and word lists for everyday
   chat, plus phrases drawn from jieba's 349k-word dictionary by frequency, numbers, Latin,
   emoji and rare characters) as Parquet files in the dialogue-table layout;
2. times plain single-process `jieba.lcut` over every turn (HMM on, as the default config),
   then the stage's word cutter (pipelines/segment.py) on the same text, checking that it
   gives exactly jieba's words; it also prints how many runs of unknown characters repeat an earlier one: the stage
   remembers the HMM's split of those per actor (see pipelines/segment.py), so that share
   matters to its speed;
3. starts a 2-CPU local Ray cluster (not timed) and times `segment_dataset` reading those
   files and writing the words to Parquet (actor start-up included), for the corpus and for
   one 4x its size, sampling the memory of the driver and every Ray process (summed PSS: the
   shared object-store pages are counted once, not once per process that maps them).

Prints chars/s for each, their ratio (target >= 1.7 on 2 cores) and the peak memory of both
Ray runs (their ratio must stay within 1.3: the stage streams). The last line is JSON:
{"ratio": ..., "memory_growth": ..., ...}. Needs psutil (pip install psutil).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")

# -- corpus -----------------------------------------------------------------------------------
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
GIVEN = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英华玉萍红娥玲芬燕彩春菊兰凤洁梅琳素云莲真环雪荣爱妹霞香月莺媛艳瑞凡佳嘉琼勤珍贞莉桂娣叶璧璐娅琦晶妍茜秋珊莎锦黛青倩婷姣婉娴瑾颖露瑶怡婵雁蓓纨仪荷丹蓉眉君琴蕊薇菁梦岚苑婕馨瑗琰韵融园艺咏卿聪澜纯毓悦昭冰爽琬茗羽希宁欣飘育滢馥筠柔竹霭凝晓欢霄枫芸菲寒伊亚宜可姬舒影荔枝思丽"
PLACES = ["北京", "上海", "广州", "深圳", "杭州", "成都", "重庆", "武汉", "西安", "南京", "天津", "苏州", "长沙",
          "郑州", "青岛", "厦门", "昆明", "大连", "哈尔滨", "三亚", "拉萨", "桂林", "丽江", "香港", "台北", "东京",
          "首尔", "纽约", "伦敦", "巴黎", "学校", "公司", "图书馆", "咖啡馆", "健身房", "超市", "医院", "火车站",
          "机场", "公园", "电影院", "老家", "宿舍", "食堂", "商场", "海边", "山上", "酒店", "地铁站", "办公室"]
TIMES = ["今天", "明天", "昨天", "后天", "前天", "周末", "下周", "上周", "这个月", "下个月", "今年", "明年", "去年",
         "早上", "中午", "下午", "晚上", "半夜", "刚才", "最近", "以前", "以后", "现在", "一会儿", "国庆节",
         "春节", "暑假", "寒假", "元旦", "中秋节", "生日那天", "下班以后", "放学以后", "吃完饭", "年底"]
NOUNS = ["火锅", "烤鸭", "小笼包", "奶茶", "咖啡", "饺子", "面条", "米饭", "水果", "蛋糕", "烧烤", "麻辣烫", "电影",
         "电视剧", "综艺", "小说", "漫画", "游戏", "音乐", "演唱会", "篮球", "足球", "羽毛球", "跑步", "游泳",
         "瑜伽", "考试", "作业", "论文", "项目", "会议", "报告", "工作", "工资", "老板", "同事", "同学", "老师",
         "朋友", "男朋友", "女朋友", "爸妈", "孩子", "小猫", "小狗", "手机", "电脑", "耳机", "相机", "衣服",
         "鞋子", "房子", "房租", "天气", "雨伞", "快递", "外卖", "地铁", "高铁", "飞机票", "护照", "签证", "简历",
         "面试", "驾照", "汽车", "自行车", "感冒", "医生", "药", "头发", "礼物", "红包", "花", "照片", "视频",
         "直播", "新闻", "股票", "基金", "比赛", "冠军", "动物园", "博物馆", "展览", "书店", "钢琴", "吉他"]
VERBS = ["吃", "喝", "看", "买", "去", "玩", "学", "做", "写", "听", "唱", "打", "找", "等", "想", "喜欢", "讨厌",
         "准备", "打算", "参加", "完成", "修改", "讨论", "推荐", "分享", "收到", "寄", "借", "还", "租", "订",
         "取消", "预约", "练习", "复习", "学习", "研究", "拍", "逛", "骑", "开", "坐", "换", "修", "洗", "收拾",
         "整理", "下载", "上传", "更新", "安装", "卸载", "充值", "排队", "加班", "请假", "出差", "旅游", "搬家"]
ADJS = ["好", "不错", "一般", "好吃", "好看", "好玩", "有意思", "无聊", "累", "忙", "闲", "开心", "难过", "生气",
        "紧张", "兴奋", "舒服", "难受", "贵", "便宜", "远", "近", "热", "冷", "暖和", "凉快", "方便", "麻烦",
        "简单", "复杂", "厉害", "可爱", "漂亮", "帅", "新", "旧", "快", "慢", "干净", "乱", "安静", "热闹", "辛苦"]
ADVS = ["很", "太", "真", "挺", "特别", "非常", "有点", "比较", "超级", "稍微", "实在", "确实", "好像", "一直"]
PRONOUNS = ["我", "你", "他", "她", "我们", "你们", "他们", "咱们", "大家", "我妈", "我爸", "我姐", "我哥", "室友"]
ENDINGS = ["。", "！", "？", "~", "…", "吧。", "呢？", "啊！", "哈哈", "嘿嘿", "呀", "啦", "嘛", "了。", ""]
LATIN = ["OK", "ok", "iPhone", "Python", "NBA", "KTV", "App", "wifi", "PPT", "Excel", "VR", "AI", "GPT", "bug",
         "Hello", "thanks", "DIY", "CEO", "PM2.5", "5G", "USB", "B站", "QQ", "vlog"]
EMOJI = ["😀", "😂", "👍", "❤️", "🙏", "😭", "🎉", "😅", "🤔", "🌹"]
# Traditional, rare and variant characters: where a different HMM would show.
RARE = "諾囗奿勲氤榋靴兪耓鈫鬋惏鸈鱒謎轱谲匮漤龘靐齉爩麤灪鬱龖罍鑫淼焱垚"

TEMPLATES = [
    "{p}{t}想去{place}{v}{n}，{q}",
    "{t}{place}的天气{adv}{adj}{end}",
    "你{t}有空吗？我们一起去{v}{n}吧",
    "{p}觉得这个{n}{adv}{adj}{end}",
    "好啊，几点在{place}见？",
    "{t}{num}点吧，别迟到了",
    "{name}说{t}要{v}{n}，你去不去？",
    "我{adv}{v}{n}，你呢？",
    "{n}多少钱？{num}块钱{end}",
    "这家的{n}{adv}{adj}，下次还来",
    "{t}{v}了{num}个小时的{n}，{adv}{adj}",
    "哈哈，你{adv}{adj}了",
    "{name}，你的{n}到了没有？",
    "还没呢，{t}应该能到",
    "{phrase}，{p}{adv}{adj}{end}",
    "听说{name}{t}在{place}{v}{n}了",
    "真的假的？{phrase}",
    "我在{place}，{phrase}{end}",
    "{latin}{v}不了，{adv}{adj}{end}",
    "{t}的{n}{adv}{adj}{emoji}",
    "{p}{t}{v}了{phrase}",
    "嗯嗯，知道了，{t}再说",
    "谢谢你提醒我，不然{p}就忘了",
    "{name}{rare}{rare}是{place}人吗？",
    "你{t}的{n}{v}完了吗？{p}还在{v}{n}",
    "{phrase}{phrase}{end}",
]


class CorpusGenerator:
    """Deterministic dialogue text: same seed, same corpus."""

    def __init__(self, seed: int = 0):
        import jieba

        self.rng = random.Random(seed)
        words, freqs = [], []
        with open(os.path.join(os.path.dirname(jieba.__file__), "dict.txt"), encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and all("\u4e00" <= ch <= "\u9fff" for ch in parts[0]):
                    words.append(parts[0])
                    freqs.append(int(parts[1]) ** 0.5)  # flatten the Zipf head: more varied vocabulary
        self.words = words
        acc, total = [], 0.0
        for w in freqs:
            total += w
            acc.append(total)
        self.cum = acc

    def phrase(self) -> str:
        return "".join(self.rng.choices(self.words, cum_weights=self.cum, k=self.rng.randint(2, 5)))

    def utterance(self) -> str:
        r = self.rng
        template = r.choice(TEMPLATES)
        slots = {
            "p": lambda: r.choice(PRONOUNS), "t": lambda: r.choice(TIMES), "place": lambda: r.choice(PLACES),
            "v": lambda: r.choice(VERBS), "n": lambda: r.choice(NOUNS), "adj": lambda: r.choice(ADJS),
            "adv": lambda: r.choice(ADVS), "end": lambda: r.choice(ENDINGS), "num": lambda: str(r.randint(1, 2000)),
            "name": lambda: r.choice(SURNAMES) + "".join(r.choices(GIVEN, k=r.randint(1, 2))),
            "q": lambda: r.choice(["你去吗？", "一起吗？", "怎么样？", "好不好？", "可以吗？"]),
            "phrase": self.phrase, "latin": lambda: r.choice(LATIN), "emoji": lambda: r.choice(EMOJI),
            "rare": lambda: r.choice(RARE),
        }
        out, i = [], 0
        while i < len(template):
            j = template.find("{", i)
            if j < 0:
                out.append(template[i:])
                break
            k = template.index("}", j)
            out.append(template[i:j])
            out.append(slots[template[j + 1:k]]())
            i = k + 1
        return "".join(out)

    def dialogue(self) -> list[str]:
        return [self.utterance() for _ in range(self.rng.randint(2, 8))]


def write_corpus(folder: Path, megabytes: float, seed: int, per_file: int = 4000) -> dict:
    """Parquet files of DIALOGUE_SCHEMA rows until the turns hold `megabytes` of UTF-8."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zhchat.tables import DIALOGUE_SCHEMA, dialogue_row

    folder.mkdir(parents=True, exist_ok=True)
    gen = CorpusGenerator(seed)
    target = megabytes * 1e6
    size = chars = dialogues = files = 0
    while size < target:
        rows = []
        for _ in range(per_file):
            turns = gen.dialogue()
            rows.append(dialogue_row(turns, f"bench-{seed}"))
            chars += sum(map(len, turns))
            size += sum(len(t.encode("utf-8")) for t in turns)
            if size >= target:
                break
        pq.write_table(pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA), folder / f"part-{files:05d}.parquet")
        files += 1
        dialogues += len(rows)
    return {"path": str(folder), "files": files, "dialogues": dialogues, "chars": chars, "mb": round(size / 1e6, 1)}


def iter_turn_files(folder: Path):
    import pyarrow.parquet as pq

    for path in sorted(folder.glob("*.parquet")):
        yield [t for turns in pq.read_table(path, columns=["turns"]).column("turns").to_pylist() for t in turns]


# -- single process ---------------------------------------------------------------------------
def single_process(folder: Path) -> dict:
    """Plain jieba.lcut over every turn (timed), then the stage's word cutter on the same
    turns, compared word for word."""
    import jieba

    from pipelines.segment import make_tokenizer
    from zhchat.config import SegmentConfig

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()  # dictionary load is not part of the per-char rate
    fast = make_tokenizer(SegmentConfig())

    chars = seconds = fast_seconds = differ = turns_n = 0
    example = None
    for turns in iter_turn_files(folder):
        t0 = time.perf_counter()
        ref = [jieba.lcut(t) for t in turns]
        seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        got = [fast.lcut(t) for t in turns]
        fast_seconds += time.perf_counter() - t0
        for t, a, b in zip(turns, ref, got):
            if a != b:
                differ += 1
                example = example or (t, a, b)
        chars += sum(map(len, turns))
        turns_n += len(turns)
    return {"chars": chars, "seconds": round(seconds, 2), "chars_per_s": chars / seconds,
            "cutter_chars_per_s": chars / fast_seconds,
            "turns_compared": turns_n, "turns_differing": differ, "first_difference": example,
            "cache_hit_rates": fast.cache_hit_rates()}


# -- Ray stage --------------------------------------------------------------------------------
class MemorySampler:
    """Peaks of the summed PSS of this process and all its descendants (the local Ray
    cluster: GCS, raylet with the object store, workers, actors), sampled every 0.5 s from
    /proc/PID/smaps_rollup (a few ms each: sampling faster would take CPU from the stage
    being timed). Besides the total it keeps the peak of each kind of page: `peak_heap`
    (Pss_Anon + Pss_File: process heaps, libraries) and `peak_object_store` (Pss_Shmem: the
    plasma store's pages in /dev/shm, which hold blocks in flight and materialised datasets
    and spill to disk when the store fills, so they cannot take a machine out of memory)."""

    def __init__(self, interval: float = 0.5):
        import psutil

        self.psutil = psutil
        self.interval = interval
        self.peak = self.peak_workers = self.peak_heap = self.peak_object_store = 0
        self.heap_by_process: dict[str, int] = {}  # at the heap's peak: process title -> bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rollup(pid: int) -> dict[str, int]:
        """Pss, Pss_Anon, Pss_File, Pss_Shmem of one process, in bytes."""
        out = {}
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key.startswith("Pss"):
                    out[key] = int(rest.split()[0]) << 10
        return out

    def sample(self) -> tuple[int, int]:
        """(total, driver + Ray workers) PSS now; updates the per-kind peaks."""
        me = self.psutil.Process()
        total = workers = heap = shm = 0
        by_process: dict[str, int] = {}
        for p in [me] + me.children(recursive=True):
            try:
                mem = self.rollup(p.pid)
                value = mem.get("Pss", 0)
                total += value
                own = mem.get("Pss_Anon", 0) + mem.get("Pss_File", 0)
                heap += own
                title = "driver" if p.pid == me.pid else (p.cmdline() or [p.name()])[0].split("/")[-1][:60]
                by_process[title] = by_process.get(title, 0) + own
                shm += mem.get("Pss_Shmem", 0)
                if p.pid == me.pid or "ray::" in p.name() or "default_worker" in " ".join(p.cmdline()[:3]):
                    workers += value
            except (OSError, self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
        if heap > self.peak_heap:
            self.peak_heap, self.heap_by_process = heap, by_process
        self.peak_object_store = max(self.peak_object_store, shm)
        return total, workers

    def _run(self):
        while not self._stop.is_set():
            total, workers = self.sample()
            self.peak = max(self.peak, total)
            self.peak_workers = max(self.peak_workers, workers)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def ray_stage(folder: Path, out: Path, chars: int) -> dict:
    import ray

    from pipelines.segment import segment_dataset
    from zhchat.config import SegmentConfig

    shutil.rmtree(out, ignore_errors=True)
    sampler = MemorySampler()
    idle, _ = sampler.sample()
    with sampler:
        t0 = time.perf_counter()
        ds = ray.data.read_parquet(str(folder))
        segment_dataset(ds, SegmentConfig()).write_parquet(str(out))
        seconds = time.perf_counter() - t0
    rows = ray.data.read_parquet(str(out)).select_columns(["id"]).count()
    shutil.rmtree(out, ignore_errors=True)
    return {"chars": chars, "seconds": round(seconds, 2), "chars_per_s": chars / seconds, "rows_written": rows,
            "idle_mb": round(idle / 2**20), "peak_mb": round(sampler.peak / 2**20),
            "peak_driver_and_workers_mb": round(sampler.peak_workers / 2**20)}


def fresh_cluster_stage(folder: Path, out: Path, chars: int) -> dict:
    """Each size on its own new 2-CPU cluster, so both start from the same state (idle
    workers left by one run would count in the next one's memory)."""
    import ray

    # address="local": always a new cluster, never one that `ray start` left running here
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        from zhchat.runtime import configure_data

        configure_data()  # the project's Ray Data settings, as every stage has them
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Part of starting the cluster (not timed): a trivial job on 4 half-CPU tasks gets
        # the worker pool up, with Ray Data imported, as a cluster that has run a job has.
        ray.data.range(16, override_num_blocks=4).map_batches(lambda b: b, num_cpus=0.5).count()
        return ray_stage(folder, out, chars)
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 MB corpus: a smoke run, numbers mean nothing")
    ap.add_argument("--mb", type=float, help="corpus size in MB of UTF-8 text (default 30, --quick 3)")
    ap.add_argument("--workdir", help="where to put the corpus (default: a temporary folder, removed)")
    args = ap.parse_args()
    mb = args.mb or (3.0 if args.quick else 30.0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="zhchat-bench-"))
    try:
        t0 = time.perf_counter()
        small = write_corpus(work / "corpus_1x", mb, seed=1)
        large = write_corpus(work / "corpus_4x", 4 * mb, seed=2)
        print(f"corpus: {small['mb']} MB ({small['chars']:,} chars, {small['dialogues']:,} dialogues, "
              f"{small['files']} files) and {large['mb']} MB for memory; generated in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

        single = single_process(work / "corpus_1x")
        print(f"single process jieba.lcut: {single['chars_per_s']:,.0f} chars/s ({single['seconds']} s)", flush=True)
        print(f"the stage's word cutter: {single['cutter_chars_per_s']:,.0f} chars/s in one "
              f"process; {single['turns_differing']} of {single['turns_compared']:,} turns segmented differently "
              f"from jieba", flush=True)
        hits = single["cache_hit_rates"]
        print(f"cut before (remembered by the cutter): {hits['blocks']:.1%} of blocks, "
              f"{hits['hmm_runs']:.1%} of the unknown-character runs of the others", flush=True)
        if single["first_difference"]:
            print(f"  first difference: {single['first_difference']}", flush=True)

        stage_1x = fresh_cluster_stage(work / "corpus_1x", work / "out", small["chars"])
        print(f"Ray Data segment stage (2 CPUs): {stage_1x['chars_per_s']:,.0f} chars/s ({stage_1x['seconds']} s), "
              f"peak memory {stage_1x['peak_mb']:,} MB (idle cluster {stage_1x['idle_mb']:,} MB)", flush=True)
        stage_4x = fresh_cluster_stage(work / "corpus_4x", work / "out", large["chars"])
        print(f"Ray Data segment stage on 4x: {stage_4x['chars_per_s']:,.0f} chars/s ({stage_4x['seconds']} s), "
              f"peak memory {stage_4x['peak_mb']:,} MB (idle cluster {stage_4x['idle_mb']:,} MB)", flush=True)

        ratio = stage_1x["chars_per_s"] / single["chars_per_s"]
        growth = stage_4x["peak_mb"] / stage_1x["peak_mb"]
        print(f"speed-up over one process: {ratio:.2f} (target >= 1.7); memory 4x/1x: {growth:.2f} (limit 1.3)")
        print(json.dumps({
            "ratio": round(ratio, 3), "memory_growth": round(growth, 3),
            "single_chars_per_s": round(single["chars_per_s"]), "ray_chars_per_s": round(stage_1x["chars_per_s"]),
            "ray_4x_chars_per_s": round(stage_4x["chars_per_s"]),
            "cutter_chars_per_s": round(single["cutter_chars_per_s"]),
            "cutter_identical_to_jieba": single["turns_differing"] == 0, "turns_compared": single["turns_compared"],
            "cache_hit_rates": {k: round(v, 3) for k, v in single["cache_hit_rates"].items()},
            "peak_mb_1x": stage_1x["peak_mb"], "peak_mb_4x": stage_4x["peak_mb"],
            "above_idle_mb_1x": stage_1x["peak_mb"] - stage_1x["idle_mb"],
            "above_idle_mb_4x": stage_4x["peak_mb"] - stage_4x["idle_mb"],
            "corpus_mb": small["mb"], "corpus_chars": small["chars"], "quick": args.quick,
        }, ensure_ascii=False))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
