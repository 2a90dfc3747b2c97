"""The plant's ClientApp: thin handlers that turn a Message into task code and back."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from pydantic import ValidationError
from torch import nn

from fl_client.config import PlantConfig
from fl_client.fault_drill import fault_drill_mod
from fl_client.mods import central_clipping_mod, plant_declines_mod, update_encoding_mod
from fl_client.resident import plant_data
from maxfl.errors import ConfigError, UserError
from maxfl.messages import (
    ACK, ARRAYS, CONFIG, CONTRIBUTION, DEPLOY, EVALUATION, FINGERPRINT_KEY, METRICS, ONNX, PLANT, PRIVACY_PREFIX, PROFILE, RELEASE, WEIGHT_KEY,
    ContributionRequest, DataQuery, DeployAck,
    RoundInstructions,
)
from maxfl.release import ReleaseManifest
from maxfl.weights import pack, unpack_into
from privacy.budget import authorize_round
from privacy.dpsgd import DPSGD
from privacy.recipe import recipe_batch_size
from tasks import get_task
from tasks.base import PlantData, Task, TaskSpec, TrainSettings

if TYPE_CHECKING:
    from edge.store import EdgeStore

app = ClientApp(mods=[plant_declines_mod])
log = logging.getLogger("maxfl")


def _prepare(msg: Message, context: Context) -> tuple[PlantConfig, RoundInstructions, Task, TaskSpec, PlantData]:
    plant = PlantConfig.from_context(context)
    instructions = RoundInstructions.parse(msg.content[CONFIG])
    task = get_task(instructions.task)
    try:
        spec = task.spec_type.model_validate_json(instructions.task_spec)
    except ValidationError as exc:
        raise ConfigError(f"the anchor sent an unreadable {task.name} task spec ({exc.error_count()} error(s))") from None
    data = plant_data(task, plant.data_dir, instructions.seed, spec)
    return plant, instructions, task, spec, data


def _load_model(task: Task, spec: TaskSpec, msg: Message) -> nn.Module:
    return unpack_into(task.build_model(spec), msg.content[ARRAYS])


def _reply(msg: Message, plant: PlantConfig, content: RecordDict) -> Message:
    content[PLANT] = ConfigRecord({"plant-id": plant.plant_id})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Describe the plant's data (schema and statistics, never rows) so the anchor can check agreement."""
    plant = PlantConfig.from_context(context)
    request = DataQuery.parse(msg.content[CONFIG])
    profile = get_task(request.task).profile(plant.data_dir, request.seed)
    return _reply(msg, plant, RecordDict({CONFIG: ConfigRecord({PROFILE: profile.model_dump_json(by_alias=True)})}))


# The drill corrupts what leaves, after clipping; the encoding is the last thing done to it.
@app.train(mods=[update_encoding_mod, fault_drill_mod, central_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """Train one round under the plant's privacy ceiling: the ledger records the round before training starts."""
    plant, instructions, task, spec, data = _prepare(msg, context)
    records = len(data.private_records())
    private = instructions.privacy == "dp-sgd"
    batch_size = recipe_batch_size(records) if private and instructions.dp_recipe == "auto" else instructions.batch_size
    grant = authorize_round(
        plant.privacy(), instructions, fingerprint=data.fingerprint, task=task.name, records=records,
        run_id=instructions.run_series or msg.metadata.run_id, server_round=instructions.server_round, epochs=instructions.local_epochs,
        batch_size=batch_size, num_rounds=instructions.num_server_rounds,
    )
    model = _load_model(task, spec, msg)
    evaluation = _evaluation(task, model, data, spec) if instructions.evaluate_first else None
    settings = TrainSettings.for_round(
        instructions.local_epochs, batch_size, instructions.learning_rate, instructions.lr_schedule,
        instructions.seed, plant.plant_id, instructions.server_round, instructions.num_server_rounds,
    )
    if grant.private:
        settings = replace(settings, local_training=DPSGD(grant.mechanism, grant.max_grad_norm))
    metrics = grant.report(task.train(model, data, settings, spec)) | {f"{PRIVACY_PREFIX}batch_size": float(batch_size)}
    metrics[WEIGHT_KEY] = len(data.y_train)
    reply = _reply(msg, plant, RecordDict({METRICS: MetricRecord(metrics), ARRAYS: pack(model)}))
    reply.content[PLANT][FINGERPRINT_KEY] = grant.fingerprint  # with dp_epsilon: the anchor sees a lifetime spend go down
    if evaluation is not None:
        reply.content[EVALUATION] = evaluation
    return reply


def _evaluation(task: Task, model: nn.Module, data: PlantData, spec: TaskSpec) -> MetricRecord:
    """The model's metrics on the held-out split, weighted by its size: what the evaluate handler answers."""
    metrics = task.evaluate(model, data, spec)
    metrics[WEIGHT_KEY] = len(data.y_test)
    return MetricRecord(metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate on the plant's held-out split. With an ONNX file attached (the release gate), also measure how far
    the export's outputs are from the torch model's on these real records."""
    plant, _, task, spec, data = _prepare(msg, context)
    model = _load_model(task, spec, msg)
    metrics = _evaluation(task, model, data, spec)
    if ONNX in msg.content.config_records:
        from maxfl import onnx_model

        try:
            session = onnx_model.session(bytes(msg.content[ONNX]["model"]))  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(f"the anchor sent an ONNX file that does not load: {exc}") from None
        if data.export_inputs is None:
            metrics["onnx_max_abs_diff"] = onnx_model.max_deviation(session, model, data.x_test.numpy())
        else:  # the export is the whole pipeline: run it on the images, the trained head on their cached features
            raw = data.export_inputs().numpy()
            metrics["onnx_max_abs_diff"] = onnx_model.max_deviation(session, model, data.x_test[: len(raw)].numpy(), onnx_inputs=raw)
    return _reply(msg, plant, RecordDict({METRICS: metrics}))


@app.query(CONTRIBUTION)
def contribution(msg: Message, context: Context) -> Message:
    """Score the anchor's rebuilt sub-federation models (fl_server.run.contribution) on the held-out split, one row of
    the stacked array per model. Nothing trains and the ledger is not touched (no epsilon); only the scores leave."""
    plant, _, task, spec, data = _prepare(msg, context)
    request = ContributionRequest.parse(msg.content[CONTRIBUTION])
    stacked = msg.content[ARRAYS].to_numpy_ndarrays()
    if len(stacked) != 1 or stacked[0].ndim != 2:
        raise ConfigError(f"the anchor sent contribution models as arrays {[a.shape for a in stacked]}, not one stack of models")
    model = task.build_model(spec)
    scores: list[float] = []
    metrics: dict[str, float] = {}
    for row in stacked[0]:
        metrics = task.evaluate(unpack_into(model, ArrayRecord([row])), data, spec)
        scores.append(float(metrics.get(request.metric, float("nan"))))
    reply = {request.metric: scores, WEIGHT_KEY: len(data.y_test), "model-offset": request.offset}
    reply |= {k: metrics[k] for k in ("eval_test_classes",) if k in metrics}  # the gate leaves one-class splits uncounted
    return _reply(msg, plant, RecordDict({METRICS: MetricRecord(reply)}))


@app.query(DEPLOY)
def deploy(msg: Message, context: Context) -> Message:
    """Install an approved model in the plant's edge store. The hash is checked before anything is written and
    a refused model leaves the previous one serving; either way the anchor is told."""
    from edge.store import EdgeStore, EdgeStoreError

    plant = PlantConfig.from_context(context)
    record = msg.content[RELEASE]
    try:
        manifest = ReleaseManifest.model_validate_json(str(record["manifest"]))
    except ValidationError as exc:
        raise ConfigError(f"the anchor sent an unreadable release manifest ({exc.error_count()} error(s))") from None
    targets = [t for t in str(record.get("targets", "")).split(",") if t]
    store = EdgeStore(plant.edge_store_path())
    serving = 0
    try:
        current = store.current(manifest.model_name)
        serving = current.manifest.version if current else 0
        if targets and plant.plant_id not in targets:
            ack = DeployAck(status="not-targeted", version=manifest.version, serving=serving)
        else:
            outcome = store.install(manifest, bytes(msg.content[ONNX]["model"]))  # type: ignore[arg-type]
            ack = DeployAck(status=outcome.status, version=manifest.version, serving=outcome.version)
            if plant.personalise == "on" and ARRAYS in msg.content.array_records and outcome.version == manifest.version:
                ack = personalise_release(plant, store, manifest, msg.content[ARRAYS], ack)
    except EdgeStoreError as exc:  # a damaged store refuses too, saying what to repair
        ack = DeployAck(status="refused", version=manifest.version, serving=serving, detail=str(exc))
    return _reply(msg, plant, RecordDict({ACK: ConfigRecord(ack.to_flower())}))


def personalise_release(plant: PlantConfig, store: EdgeStore, manifest: ReleaseManifest, arrays: ArrayRecord, ack: DeployAck) -> DeployAck:
    """Serve the best of {global, personalised, local-only} on validation records from the plant's training split.
    Whatever goes wrong here, the released model stays installed and serving, and the anchor is told why."""
    from edge.store import EdgeStoreError
    from fl_client.personalise import PersonaliseSettings, choose
    from maxfl import onnx_model

    task = get_task(manifest.task)
    try:
        spec = task.spec_type.model_validate_json(manifest.task_spec)
        metric = "eval_r2" if spec.num_classes == 1 else "eval_macro_f1"
        defaults = task.training_defaults(spec)
        settings = PersonaliseSettings(epochs=5 * defaults.local_epochs, learning_rate=defaults.learning_rate,
                                       folds=defaults.validation_folds, seed=manifest.seed)
        data = task.load_plant_data(plant.data_dir, manifest.seed, spec)
        choice = choose(task, spec, unpack_into(task.build_model(spec), arrays), data, metric, settings)
        scores = ", ".join(f"{name} {score:.4f}" for name, score in choice.scores.items())
        if choice.variant == "global":
            store.clear_variant(manifest.model_name, manifest.version)
            return ack.model_copy(update={"detail": f"serving the global model (validation {metric}: {scores})"})
        onnx = onnx_model.export(task.deployable(spec, choice.model), task.input_example(spec), dynamo=False)
        store.install_variant(manifest, choice.variant, onnx, metric, choice.scores)
    except (UserError, EdgeStoreError, ValueError, RuntimeError) as exc:
        log.warning("%s: personalising %s failed, the global model keeps serving: %s", plant.plant_id, manifest.label, exc)
        return ack.model_copy(update={"detail": f"serving the global model; personalisation failed: {str(exc).splitlines()[0][:300]}"})
    return ack.model_copy(update={"variant": choice.variant, "detail": f"serving its {choice.variant} variant (validation {metric}: {scores})"})
