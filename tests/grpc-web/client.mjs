// A gRPC-Web client of keyplane, as a browser app would use it (Connect's gRPC-Web
// transport, binary format, over HTTP/1.1), built at run time from keyplane's compiled
// descriptor set: no generated code to keep in step. Run by tests/api/grpc_web.rs:
//   node client.mjs <base url> <descriptor set file> <bearer token> <workspace id>
// Creates a key, verifies it, asks for a key that does not exist, and prints what it saw
// as one JSON line.
import { readFileSync } from "node:fs";
import { createFileRegistry, fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-node";

const [baseUrl, descriptors, token, workspaceId] = process.argv.slice(2);
const registry = createFileRegistry(
  fromBinary(FileDescriptorSetSchema, readFileSync(descriptors)),
);
const service = registry.getService("keyplane.v1.ApiKeyService");
const verifyCode = registry.getEnum("keyplane.v1.VerifyCode");

const transport = createGrpcWebTransport({
  baseUrl,
  httpVersion: "1.1",
  useBinaryFormat: true,
  interceptors: [
    (next) => async (request) => {
      request.header.set("authorization", `Bearer ${token}`);
      return next(request);
    },
  ],
});
const client = createClient(service, transport);

const created = await client.createApiKey({
  workspaceId,
  name: "browser",
  scopes: ["crm:read"],
});
const verified = await client.verifyApiKey({
  key: created.secret,
  requiredScopes: ["crm:read"],
});
let missing;
try {
  await client.getApiKey({ id: "01a24845-0000-7000-8000-000000000000" });
  missing = "found";
} catch (error) {
  missing = ConnectError.from(error).code; // 5: NOT_FOUND
}
console.log(
  JSON.stringify({
    keyId: created.apiKey.id,
    code: verifyCode.value[verified.code].name,
    missing,
  }),
);
