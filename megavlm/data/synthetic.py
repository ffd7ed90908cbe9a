"""The built-in synthetic multimodal dataset: drawn scenes with exact answers.

Sample ``i`` of seed ``s`` is a pure function of ``(s, i)``: no files, no downloads. Tasks
(all answers exact, so they double as verifiable rewards for RL):

* ``caption``: list the shapes ("1 red circle, 2 blue squares");
* ``count``: "How many green shapes?";
* ``box`` / ``point``: where a named shape is, as Qwen-style integers in 0..1000;
* ``ocr``: the word written in the image;
* ``motion``: a short video of a moving square, "Which way does the square move?";
* ``appear``: a video where a circle appears, "At what second does the circle appear?";
* ``text``: arithmetic with no media.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from megavlm.data.sample import Media, Message, Sample
from megavlm.data.video import pair_timestamps

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("square", "circle", "triangle")
WORDS = ("cat", "sun", "box", "map", "red", "top", "dog", "pen")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
TASKS = ("caption", "count", "box", "point", "ocr", "motion", "appear", "text")
VIDEO_FPS = 2.0


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def _qwen_box(box, w: int, h: int) -> list[int]:
    x0, y0, x1, y1 = box
    return [round(x0 / w * 1000), round(y0 / h * 1000), round(x1 / w * 1000), round(y1 / h * 1000)]


class SyntheticMultimodalDataset:
    """Index -> ``Sample``; ``size`` samples (the sampler wraps around for longer runs)."""

    def __init__(self, *, seed: int, size: int = 100_000, image_sides: tuple[int, ...] = (64, 96, 128),
                 tasks: tuple[str, ...] = TASKS):
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown synthetic tasks {sorted(unknown)}; available: {', '.join(TASKS)}")
        self.seed, self.size, self.sides, self.tasks = seed, size, image_sides, tasks

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, index % self.size])
        task = self.tasks[int(rng.integers(len(self.tasks)))]
        sample = getattr(self, f"_{task}")(rng)
        sample.id = f"synthetic-{self.seed}-{index % self.size}-{task}"
        return sample

    # --- scenes -----------------------------------------------------------------------------
    def _scene(self, rng, max_shapes: int = 4):
        """A white canvas with 1..max_shapes non-overlapping shapes on a 4x4 cell grid."""
        w, h = (int(rng.choice(self.sides)) for _ in range(2))
        image = Image.new("RGB", (w, h), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        cells = rng.permutation(16)[: int(rng.integers(1, max_shapes + 1))]
        objects = []
        for cell in cells:
            cw, ch = w / 4, h / 4
            x0, y0 = int(cell % 4 * cw + cw * 0.15), int(cell // 4 * ch + ch * 0.15)
            box = (x0, y0, int(x0 + cw * 0.7), int(y0 + ch * 0.7))
            color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
            _draw(draw, shape, box, COLORS[color])
            objects.append((color, shape, box))
        return image, objects

    @staticmethod
    def _qa(question: str, answer: str, media: list[Media], targets: dict) -> Sample:
        parts = [{"type": m.kind, "index": i} for i, m in enumerate(media)] + [{"type": "text", "text": question}]
        return Sample(
            id="", media=media, targets=targets,
            messages=[Message("user", parts), Message("assistant", [{"type": "text", "text": answer}])],
        )

    def _caption(self, rng) -> Sample:
        image, objects = self._scene(rng)
        counts: dict[tuple[str, str], int] = {}
        for color, shape, _ in objects:
            counts[(color, shape)] = counts.get((color, shape), 0) + 1
        answer = ", ".join(f"{n} {c} {s}{'s' if n > 1 else ''}" for (c, s), n in sorted(counts.items()))
        return self._qa("Describe the image.", answer, [Media("image", array=np.asarray(image))], {"answer": answer})

    def _count(self, rng) -> Sample:
        image, objects = self._scene(rng)
        color = str(rng.choice(list(COLORS)))
        n = sum(c == color for c, _, _ in objects)
        return self._qa(f"How many {color} shapes?", str(n), [Media("image", array=np.asarray(image))], {"answer": str(n)})

    def _box(self, rng) -> Sample:
        image, objects = self._scene(rng, max_shapes=3)
        color, shape, _ = objects[int(rng.integers(len(objects)))]
        first = next(o for o in objects if o[:2] == (color, shape))  # the first of its kind is meant
        target = _qwen_box(first[2], *image.size)
        return self._qa(f"Where is the {color} {shape}? Answer with a box.", str(target),
                        [Media("image", array=np.asarray(image))], {"box": target})

    def _point(self, rng) -> Sample:
        image, objects = self._scene(rng, max_shapes=3)
        color, shape, _ = objects[int(rng.integers(len(objects)))]
        x0, y0, x1, y1 = _qwen_box(next(o for o in objects if o[:2] == (color, shape))[2], *image.size)
        point = [(x0 + x1) // 2, (y0 + y1) // 2]
        return self._qa(f"Point to the {color} {shape}.", str(point), [Media("image", array=np.asarray(image))],
                        {"point": point})

    def _ocr(self, rng) -> Sample:
        w, h = (int(rng.choice(self.sides)) for _ in range(2))
        image = Image.new("RGB", (w, h), (255, 255, 255))
        word = str(rng.choice(WORDS))
        ImageDraw.Draw(image).text((int(rng.integers(2, w // 3)), int(rng.integers(2, h // 2))), word, fill=(0, 0, 0))
        return self._qa("What word is written in the image?", word, [Media("image", array=np.asarray(image))],
                        {"answer": word})

    # --- videos -----------------------------------------------------------------------------
    def _frames(self, rng, n: int, side: int, draw_frame) -> Media:
        frames = []
        for k in range(n):
            image = Image.new("RGB", (side, side), (255, 255, 255))
            draw_frame(ImageDraw.Draw(image), k)
            frames.append(np.asarray(image))
        return Media("video", array=np.stack(frames), fps=VIDEO_FPS)

    def _motion(self, rng) -> Sample:
        side, n = int(rng.choice(self.sides)), 2 * int(rng.integers(2, 4))
        direction = str(rng.choice(list(DIRECTIONS)))
        dx, dy = DIRECTIONS[direction]
        size = side // 5
        step = (side - 2 * size) / (n - 1)
        start = [side // 2 - size // 2 - dx * (side // 2 - size), side // 2 - size // 2 - dy * (side // 2 - size)]
        color = COLORS[str(rng.choice(list(COLORS)))]

        def frame(draw, k):
            x, y = int(start[0] + dx * k * step), int(start[1] + dy * k * step)
            draw.rectangle((x, y, x + size, y + size), fill=color)

        video = self._frames(rng, n, side, frame)
        return self._qa("Which way does the square move?", direction, [video], {"answer": direction})

    def _appear(self, rng) -> Sample:
        side, n = int(rng.choice(self.sides)), 2 * int(rng.integers(2, 4))
        pair = int(rng.integers(1, n // 2))  # the circle appears with frame pair `pair`
        size = side // 4

        def frame(draw, k):
            if k // 2 >= pair:
                draw.ellipse((size, size, 2 * size, 2 * size), fill=COLORS["red"])

        video = self._frames(rng, n, side, frame)
        # the answer is the timestamp the model sees before the first pair showing the circle
        seconds = f"{pair_timestamps([2 * pair, 2 * pair + 1], VIDEO_FPS)[0]:.1f}"
        return self._qa("At what second does the circle appear?", seconds, [video], {"answer": seconds})

    def _text(self, rng) -> Sample:
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        return self._qa(f"What is {a} + {b}?", str(a + b), [], {"answer": str(a + b)})


def corpus(dataset: SyntheticMultimodalDataset, n: int) -> list[str]:
    """Every text string of the first ``n`` samples (tokenizer training)."""
    texts = []
    for i in range(n):
        for message in dataset[i].messages:
            texts += [part["text"] for part in message.content if part["type"] == "text"]
    return texts
