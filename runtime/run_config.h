// moesh's own TOML settings (plugins, threads, batching), e.g. configs/default.toml:
//
//   [plugins]
//   dirs = ["build/lib/moesh"]   # searched after --plugin-dir and $MOESH_PLUGIN_DIR
//   allowed = ["cpu"]            # empty or absent: any
//   preferred = "cpu"            # absent: the highest-scoring plugin
//   [runtime]
//   threads = 2
//   max_batch = 64
//   kv_block_size = 16
//   activations = "fast"         # or "precise": see moesh_activations in plugin.h
//   repack = true                # weights in the backend's own layout at load (runtime/backend_weights.h)
//   kv_type = "auto"             # KV cache elements: f16 where the backend offers it, else f32; or "f16"/"q8_0"/"f32"
//   [quantize]                   # at load time, from f32/f16/bf16 weights (see runtime/quantize.h)
//   experts = "q4_0"             # q8_0, q4_0 or q4_1 per class:
//   attention = "q8_0"           #   experts, attention, ffn, embeddings, output
//   [[tier]]                     # memory tiers for experts, fastest first (configs/placement.toml,
//   name = "gpu0"                #   experts/placement.h); unique names
//   kind = "gpu"                 # gpu, host or disk
//   budget = "20GiB"             # bytes the tier may hold ("512MiB", "1.5GiB" or an integer); not for disk
//   device = 0                   # gpu only
//   [placement]
//   policy = "heat"              # static, lru, lfu or heat (experts/cache_policy.h)
//   heat_decay = 0.95            # per token, in (0, 1]
//   prefetch = true
//   prefetch_min_precision = 0.75  # load predictions only while they are right this often
//   prefetch_extra = 0           # predict the router's top k + this many per token
//   direct_io = true             # O_DIRECT reads from the disk tier where the file system allows it
//   [server]                     # moesh serve (configs/serve.toml)
//   endpoint = "tcp://127.0.0.1:5555"
//   max_sequences = 16, kv_cache = "256MiB", kv_allocation = "on_demand", prefill_chunk = 32,
//   prefix_cache = true, max_queue = 64,
//   max_tokens = 4096, max_message_bytes = 1048576, send_hwm = 10000, recv_hwm = 10000,
//   drain_timeout_s = 30, log_interval_s = 10
//   [[placement.pin]]            # experts that always live on a tier
//   tier = "gpu0"
//   layers = "0-3"               # "N", "A-B" or "*"
//   experts = "*"
//
// Unknown tables or keys and wrong types are errors naming file, line and
// column. Relative plugin dirs are resolved against the TOML file's folder.
// Thread safety: plain data.
#pragma once

#include "experts/placement.h"
#include "runtime/quantize.h"

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moesh {

// `moesh serve` (configs/serve.toml).
struct ServerConfig {
    std::string endpoint = "tcp://127.0.0.1:5555";   // ZeroMQ ROUTER; "tcp://127.0.0.1:*" picks a free port
    int64_t max_sequences = 16;      // requests running at once
    uint64_t kv_cache = 256ull << 20;   // bytes of KV pool shared by the running requests
    int64_t prefill_chunk = 32;      // prompt tokens of one request per step
    bool prefix_cache = true;        // reuse cached KV blocks of a prompt's start
    // "on_demand": KV blocks as a request grows, preempting the newest when the pool is out;
    // "up_front": prompt + max_tokens reserved at admission (scheduler.h, KvAllocation).
    bool kv_up_front = false;
    int64_t max_queue = 64;          // waiting requests; beyond: "busy"
    int64_t max_tokens = 4096;       // largest max_tokens a request may ask
    int64_t max_message_bytes = 1 << 20;
    int64_t send_hwm = 10000;        // ZeroMQ high-water marks (messages)
    int64_t recv_hwm = 10000;
    double drain_timeout_s = 30;     // SIGTERM: finish running requests for at most this long
    // HTTP (OpenAI-compatible API, /health, /metrics): "ADDRESS:PORT" ("127.0.0.1:0" picks a
    // free port), or "" for none.
    std::string http = "127.0.0.1:8090";
    int64_t http_max_connections = 256;
    double http_request_timeout_s = 30;   // to receive a request; also the keep-alive idle limit
    int64_t default_max_tokens = 256;     // a chat request that gives no max_tokens
    double log_interval_s = 10;           // a status line on stderr this often while serving; 0: none
    // Who may connect (transport/security.h); paths, relative to the config file's folder.
    std::string curve_secret_key;         // the server's CURVE certificate (NAME.key_secret): CURVE on
    std::string curve_authorized_keys;    // a folder of *.key certificates or a file of keys: only these clients
    std::string api_key_file;             // HTTP: /v1/ routes need "Authorization: Bearer KEY" with a key from it
};

// "127.0.0.1:8080" / "[::1]:8080" -> address and port; false when not that shape.
bool parse_host_port(std::string_view text, std::string * address, uint16_t * port);

// "512MiB", "1.5GiB", "2GB", "4096" -> bytes; false when not a size.
bool parse_byte_size(std::string_view text, uint64_t * out);

struct RunConfig {
    std::vector<std::string> plugin_dirs;
    std::vector<std::string> allowed_plugins;
    std::string preferred_plugin;
    int32_t threads = 0;        // 0 = the backend decides
    int64_t max_batch = 64;
    int64_t kv_block_size = 16;
    bool precise_activations = false;
    bool repack = true;
    int32_t kv_type = -1;   // [runtime] kv_type: MOESH_DTYPE_F32, MOESH_DTYPE_F16, MOESH_DTYPE_Q8_0, or -1 (auto: f16 where offered)
    QuantizePlan quantize;
    PlacementConfig placement;
    ServerConfig server;
};

RunConfig parse_run_config(std::string_view toml_text, std::string_view source_name);
RunConfig load_run_config(const std::string & path);


} // namespace moesh
