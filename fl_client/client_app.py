"""The plant's ClientApp: thin handlers that turn a Message into task code and back."""

from __future__ import annotations

import zlib

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fl_client.config import PlantConfig
from fl_client.mods import plant_declines_mod
from maxfl.messages import ARRAYS, CONFIG, METRICS, PLANT, WEIGHT_KEY, RoundInstructions
from maxfl.weights import pack, unpack_into
from tasks import get_task
from tasks.base import PlantData, Task, TrainSettings

app = ClientApp(mods=[plant_declines_mod])


def _prepare(msg: Message, context: Context) -> tuple[PlantConfig, RoundInstructions, Task, PlantData]:
    plant = PlantConfig.from_context(context)
    instructions = RoundInstructions.parse(msg.content[CONFIG])
    task = get_task(instructions.task)
    data = task.load_plant_data(plant.data_dir, seed=instructions.seed)
    return plant, instructions, task, data


def _load_model(task: Task, msg: Message) -> nn.Module:
    return unpack_into(task.build_model(), msg.content[ARRAYS])


def _reply(msg: Message, plant: PlantConfig, metrics: dict[str, float], arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({METRICS: MetricRecord(metrics), PLANT: ConfigRecord({"plant-id": plant.plant_id})})
    if arrays is not None:
        content[ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    plant, instructions, task, data = _prepare(msg, context)
    model = _load_model(task, msg)
    settings = TrainSettings(
        epochs=instructions.local_epochs,
        batch_size=instructions.batch_size,
        learning_rate=instructions.learning_rate,
        # Different plants and rounds draw different batches and augmentations, reproducibly.
        seed=zlib.crc32(f"{instructions.seed}/{plant.plant_id}/{instructions.server_round}".encode()),
    )
    metrics = task.train(model, data, settings)
    metrics[WEIGHT_KEY] = len(data.y_train)
    return _reply(msg, plant, metrics, pack(model))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    plant, _, task, data = _prepare(msg, context)
    metrics = task.evaluate(_load_model(task, msg), data)
    metrics[WEIGHT_KEY] = len(data.y_test)
    return _reply(msg, plant, metrics)
