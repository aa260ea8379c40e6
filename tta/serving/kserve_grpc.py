"""OIP over gRPC as the spec says, on top of KServe's servicer, plus the ModelConfig RPC.

KServe's `InferenceServicer` ignores model versions (any ``version`` is accepted), reports an
empty ``platform`` and no ``versions``, and calls the server ready while the model loads.
`OipServicer` fixes those on KServe's own messages. KServe's proto has no ``ModelConfig`` RPC
(Triton's model configuration extension), so `OipGrpcServer` registers one more method on the
same service name, ``inference.GRPCInferenceService/ModelConfig``, with request and response
messages built here that are wire-compatible with Triton's ``ModelConfigRequest`` /
``ModelConfigResponse`` (same field numbers and types; only the fields we fill). They live in
their own proto package so they never clash with KServe's or tritonclient's descriptors.
"""

from __future__ import annotations

from concurrent import futures
from typing import Any

import grpc
import kserve
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc import aio
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer

from tta.serving.kserve_model import EXTENSIONS, ClipTTAModel, ServingError, all_ready, served_model

SERVICE = "inference.GRPCInferenceService"
TRITON_TYPE_NUMBERS = {"TYPE_STRING": 13, "TYPE_FP32": 11}  # Triton's DataType enum values


def _config_messages() -> tuple[type, type]:
    """ModelConfigRequest {name=1, version=2} and ModelConfigResponse {config=1: ModelConfig} with
    ModelConfig {name=1, platform=2, version_policy=3 (unset), max_batch_size=4, input=5,
    output=6, backend=17}, ModelInput {name=1, data_type=2, dims=4}, ModelOutput {name=1,
    data_type=2, dims=3}: Triton's field numbers, so tritonclient and perf_analyzer parse them."""
    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="tta_model_config.proto", package="tta.oip", syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        m = proto.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            m.field.add(name=field_name, number=number, type=kind, label=label, type_name=type_name or None)

    one, many = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    message("ModelConfigRequest", ("name", 1, f.TYPE_STRING, one, ""), ("version", 2, f.TYPE_STRING, one, ""))
    message("ModelInput", ("name", 1, f.TYPE_STRING, one, ""), ("data_type", 2, f.TYPE_INT32, one, ""),
            ("dims", 4, f.TYPE_INT64, many, ""))
    message("ModelOutput", ("name", 1, f.TYPE_STRING, one, ""), ("data_type", 2, f.TYPE_INT32, one, ""),
            ("dims", 3, f.TYPE_INT64, many, ""))
    message("ModelConfig", ("name", 1, f.TYPE_STRING, one, ""), ("platform", 2, f.TYPE_STRING, one, ""),
            ("max_batch_size", 4, f.TYPE_INT32, one, ""), ("input", 5, f.TYPE_MESSAGE, many, ".tta.oip.ModelInput"),
            ("output", 6, f.TYPE_MESSAGE, many, ".tta.oip.ModelOutput"), ("backend", 17, f.TYPE_STRING, one, ""))
    message("ModelConfigResponse", ("config", 1, f.TYPE_MESSAGE, one, ".tta.oip.ModelConfig"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("tta.oip.ModelConfigRequest")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("tta.oip.ModelConfigResponse")))


ModelConfigRequest, ModelConfigResponse = _config_messages()


class OipServicer(InferenceServicer):
    """KServe's servicer with versions, platform, readiness and ModelConfig as OIP says."""

    def _model(self, name: str, version: str) -> ClipTTAModel:
        return served_model(self._data_plane, name, version or None)  # NOT_FOUND for a name or version

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        meta = self._data_plane.metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"],
                                         extensions=sorted({*meta["extensions"], *EXTENSIONS}))

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=all_ready(self._data_plane))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._model(request.name, request.version).ready)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        meta = self._model(request.name, request.version).metadata()
        tensors = [{k: t[k] for k in ("name", "datatype", "shape")} for t in meta["inputs"] + meta["outputs"]]
        n_in = len(meta["inputs"])
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=tensors[:n_in], outputs=tensors[n_in:])

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        self._model(request.model_name, request.model_version)
        return await super().ModelInfer(request, context)

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        config = self._model(request.name, request.version).model_config()

        def tensor(t: dict[str, Any]) -> dict[str, Any]:
            return {"name": t["name"], "data_type": TRITON_TYPE_NUMBERS[t["data_type"]], "dims": t["dims"]}

        return ModelConfigResponse(config={
            "name": config["name"], "platform": config["platform"], "backend": config["backend"],
            "max_batch_size": config["max_batch_size"], "input": [tensor(t) for t in config["input"]],
            "output": [tensor(t) for t in config["output"]]})


class OipGrpcServer(GRPCServer):
    """KServe's gRPC server with `OipServicer` and the extra ModelConfig method."""

    async def start(self, max_workers: int) -> None:
        servicer = OipServicer(self._data_plane, self._model_repository_extension)
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                     ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length"))])
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        config = grpc.unary_unary_rpc_method_handler(servicer.ModelConfig,
                                                     request_deserializer=ModelConfigRequest.FromString,
                                                     response_serializer=ModelConfigResponse.SerializeToString)
        # KServe's handler answers None for a method it lacks, so this one is found next.
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"ModelConfig": config}),))
        self._server.add_insecure_port(f"[::]:{self._port}")
        await self._server.start()
        await self._server.wait_for_termination()


class OipModelServer(kserve.ModelServer):
    """KServe's ModelServer, serving gRPC with `OipGrpcServer` instead of its own."""

    def start(self, models: list[Any]) -> None:
        if self.enable_grpc:
            from kserve import model_server

            self.enable_grpc = False  # the parent must not start its own gRPC server as well
            self._grpc_server = OipGrpcServer(self.grpc_port, self.dataplane, self.model_repository_extension,
                                              kwargs=vars(model_server.args), grace_period=self.grace_period)
            self.servers.append(self._grpc_server.start(self.max_threads))
        super().start(models)


__all__ = ["OipGrpcServer", "OipModelServer", "OipServicer", "ServingError"]
