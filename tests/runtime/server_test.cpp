// `moesh serve` as a real process on a loopback port, driven by the C++ client
// over real ZeroMQ sockets: answers equal generate()'s, streaming adds up,
// cancel and clients that vanish free their requests, overload gets "busy"
// and loses nothing, bad input gets error frames while everyone else is
// served, and SIGTERM drains and exits cleanly. Every wait is bounded.
#include "runtime/generate.h"
#include "runtime/model.h"
#include "runtime/tokenizer.h"
#include "test_support.h"
#include "transport/client.h"
#include "transport/security.h"

#include <zmq.hpp>

#include <csignal>
#include <fcntl.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>

namespace moesh {
namespace {

using namespace std::chrono_literals;
const std::string k_model = std::string(MOESH_SOURCE_DIR) + "/models/moesh-tiny-py";

// moesh serve in a child process; its stderr goes to a file for the final checks.
class ServerProcess {
public:
    explicit ServerProcess(const std::string & config_text) {
        config_ = dir_.write("serve.toml", config_text).string();
        log_ = (dir_.path() / "server.log").string();
        int out[2];
        EXPECT_EQ(::pipe(out), 0);
        pid_ = ::fork();
        if (pid_ == 0) {
            ::dup2(out[1], 1);
            const int err = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
            ::dup2(err, 2);
            ::close(out[0]);
            ::execl(MOESH_BIN, MOESH_BIN, "serve", "--model", k_model.c_str(), "--config", config_.c_str(), "--endpoint",
                    "tcp://127.0.0.1:*", "--http", "off", "--threads", "2", (char *)nullptr);
            ::_exit(127);
        }
        ::close(out[1]);
        // The first stdout line is the endpoint; give it 60 s to load.
        pollfd p{out[0], POLLIN, 0};
        std::string line;
        const auto deadline = std::chrono::steady_clock::now() + 60s;
        while (line.find('\n') == std::string::npos && std::chrono::steady_clock::now() < deadline) {
            if (::poll(&p, 1, 200) > 0) {
                char buf[256];
                const ssize_t n = ::read(out[0], buf, sizeof buf);
                if (n <= 0) break;
                line.append(buf, size_t(n));
            }
        }
        ::close(out[0]);
        endpoint_ = line.substr(0, line.find('\n'));
    }
    ~ServerProcess() {
        if (pid_ > 0 && !stopped_) {
            ::kill(pid_, SIGKILL);
            ::waitpid(pid_, nullptr, 0);
        }
    }
    const std::string & endpoint() const { return endpoint_; }
    void signal(int sig) const { ::kill(pid_, sig); }
    // Waits (bounded) until the log holds `text` n times.
    bool log_has(const std::string & text, int n = 1, std::chrono::seconds limit = 20s) const {
        const auto deadline = std::chrono::steady_clock::now() + limit;
        for (;;) {
            const std::string l = log();
            int found = 0;
            for (size_t at = l.find(text); at != std::string::npos; at = l.find(text, at + 1)) ++found;
            if (found >= n) return true;
            if (std::chrono::steady_clock::now() >= deadline) return false;
            std::this_thread::sleep_for(20ms);
        }
    }
    // SIGTERM, then wait (bounded); returns the exit status, -1 if it had to be killed.
    int stop(std::chrono::seconds limit = 30s) {
        ::kill(pid_, SIGTERM);
        const auto deadline = std::chrono::steady_clock::now() + limit;
        int st = 0;
        while (std::chrono::steady_clock::now() < deadline) {
            if (::waitpid(pid_, &st, WNOHANG) == pid_) {
                stopped_ = true;
                return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
            }
            std::this_thread::sleep_for(20ms);
        }
        return -1;
    }
    std::string log() const {
        std::ifstream in(log_);
        return std::string(std::istreambuf_iterator<char>(in), {});
    }

private:
    test::TempDir dir_;
    std::string config_, log_, endpoint_;
    pid_t pid_ = -1;
    bool stopped_ = false;
};

const char * k_config = "[server]\nmax_sequences = 4\nkv_cache = \"16MiB\"\nprefill_chunk = 16\nmax_queue = 64\n"
                        "max_tokens = 512\nmax_message_bytes = 65536\ndrain_timeout_s = 10\n[runtime]\nmax_batch = 32\n";

std::vector<int32_t> alone(const Model & m, Backend & be, const std::vector<int32_t> & prompt, int64_t n) {
    GenerateOptions o;
    o.prompt = prompt;
    o.n_generate = n;
    return generate(m, be, o).tokens;
}

TEST(Server, AnswersEqualGenerateStreamingAddsUpAndManyClientsShareSteps) {
    ServerProcess srv(k_config);
    ASSERT_EQ(srv.endpoint().rfind("tcp://127.0.0.1:", 0), 0u) << srv.log();
    const Model model = Model::load_folder(k_model);
    auto be = test::open_cpu_backend(2);
    const Tokenizer tok = load_tokenizer_json_file(k_model + "/tokenizer.json");

    Client c(srv.endpoint());
    auto pong = c.request({{"type", "ping"}, {"id", "p"}}, 10s);
    ASSERT_TRUE(pong);
    EXPECT_EQ(pong->type, "pong");

    const std::string prompt = "def fibonacci(n):";
    const std::vector<int32_t> expect = alone(model, *be, tok.encode(prompt, true), 24);
    auto done = c.request({{"id", "a"}, {"prompt", prompt}, {"max_tokens", 24}}, 60s);
    ASSERT_TRUE(done) << srv.log();
    ASSERT_EQ(done->type, "done") << done->body.dump();
    EXPECT_EQ(done->body["tokens"].get<std::vector<int32_t>>(), expect);
    EXPECT_EQ(done->body["finish_reason"], "length");
    EXPECT_EQ(done->body["usage"]["completion_tokens"], 24);

    std::string streamed;
    int n_frames = 0;
    done = c.request({{"id", "s"}, {"prompt", prompt}, {"max_tokens", 24}, {"stream", true}}, 60s, [&](const protocol::Response & f) {
        streamed += f.body["text"].get<std::string>();
        EXPECT_EQ(f.body["index"], n_frames);
        ++n_frames;
    });
    ASSERT_TRUE(done);
    EXPECT_EQ(n_frames, 24);
    EXPECT_EQ(streamed, done->body["text"].get<std::string>());
    EXPECT_EQ(done->body["tokens"].get<std::vector<int32_t>>(), expect);

    // A stop string: the completion ends at it, its text is never streamed, frames still add up.
    const std::string full = done->body["text"].get<std::string>();
    ASSERT_GT(full.size(), 12u);
    const std::string stop = full.substr(full.size() / 2, 3);
    streamed.clear();
    done = c.request({{"id", "st"}, {"prompt", prompt}, {"max_tokens", 24}, {"stream", true}, {"stop", stop}}, 60s,
                     [&](const protocol::Response & f) { streamed += f.body["text"].get<std::string>(); });
    ASSERT_TRUE(done);
    EXPECT_EQ(done->body["finish_reason"], "stop");
    EXPECT_EQ(done->body["text"].get<std::string>(), full.substr(0, full.find(stop)));
    EXPECT_EQ(streamed, done->body["text"].get<std::string>());

    // A REQ-style client ([empty, body]) gets its replies in the same shape.
    {
        zmq::context_t ctx;
        zmq::socket_t req(ctx, zmq::socket_type::req);
        req.set(zmq::sockopt::linger, 0);
        req.connect(srv.endpoint());
        const std::string body = R"({"type": "ping", "id": "r"})";
        req.send(zmq::buffer(body));
        zmq::pollitem_t item{req.handle(), 0, ZMQ_POLLIN, 0};
        ASSERT_EQ(zmq::poll(&item, 1, std::chrono::milliseconds(10000)), 1);
        zmq::message_t reply;
        ASSERT_TRUE(req.recv(reply));
        EXPECT_NE(reply.to_string().find("\"pong\""), std::string::npos) << reply.to_string();
    }

    // Eight clients at once, different prompts: each gets what it would get alone.
    std::vector<std::vector<int32_t>> prompts;
    for (int i = 0; i < 8; ++i) {
        std::vector<int32_t> p;
        for (int j = 0; j < 4 + 5 * i; ++j) p.push_back(int32_t((29 * i + 13 * j + 7) % 4000));
        prompts.push_back(p);
    }
    std::vector<std::unique_ptr<Client>> clients;
    for (size_t i = 0; i < prompts.size(); ++i) {
        clients.push_back(std::make_unique<Client>(srv.endpoint()));
        clients.back()->send({{"id", "m" + std::to_string(i)}, {"prompt_ids", prompts[i]}, {"max_tokens", 12}});
    }
    for (size_t i = 0; i < prompts.size(); ++i) {
        auto f = clients[i]->receive(60s);
        ASSERT_TRUE(f) << "client " << i;
        ASSERT_EQ(f->type, "done") << f->body.dump();
        EXPECT_EQ(f->body["tokens"].get<std::vector<int32_t>>(), alone(model, *be, prompts[i], 12)) << "client " << i;
    }
    EXPECT_EQ(srv.stop(), 0) << srv.log();
    EXPECT_NE(srv.log().find("11 requests, 11 completed"), std::string::npos) << srv.log();
}

// A KV pool too small for its clients' answers (kv_allocation on_demand, the default): six
// streaming clients start at once, the newest are preempted and resumed, and every client's frames
// still add up to what it would get alone. The status line says what happened and what to do.
TEST(Server, ASmallKvPoolPreemptsAndEveryStreamIsUnchanged) {
    // 12 blocks of 16 positions (f16: 2 KiB a position on this model); the answers reach 52-77.
    ServerProcess srv("[server]\nmax_sequences = 6\nkv_cache = 393216\nprefill_chunk = 16\nmax_tokens = 100\n"
                      "log_interval_s = 0.2\ndrain_timeout_s = 10\n[runtime]\nmax_batch = 32\nkv_type = \"f16\"\n");
    ASSERT_FALSE(srv.endpoint().empty()) << srv.log();
    const Model model = Model::load_folder(k_model);
    auto be = test::open_cpu_backend(2);
    std::vector<std::vector<int32_t>> prompts;
    std::vector<std::unique_ptr<Client>> clients;
    for (int i = 0; i < 6; ++i) {
        std::vector<int32_t> p;
        for (int j = 0; j < 12 + 5 * i; ++j) p.push_back(int32_t((61 * i + 3 * j + 2) % 4000));
        prompts.push_back(p);
        clients.push_back(std::make_unique<Client>(srv.endpoint()));
        clients.back()->send({{"id", "k" + std::to_string(i)}, {"prompt_ids", p}, {"max_tokens", 40}, {"stream", true}});
    }
    int64_t preempted = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
        std::vector<int32_t> streamed;
        std::optional<protocol::Response> f;
        while ((f = clients[i]->receive(60s)) && f->type == "token") {
            EXPECT_EQ(f->body["index"], int64_t(streamed.size())) << "client " << i;
            streamed.push_back(f->body["token"].get<int32_t>());
        }
        ASSERT_TRUE(f) << "client " << i << srv.log();
        ASSERT_EQ(f->type, "done") << f->body.dump();
        const std::vector<int32_t> want = alone(model, *be, prompts[i], 40);
        EXPECT_EQ(f->body["tokens"].get<std::vector<int32_t>>(), want) << "client " << i;
        EXPECT_EQ(streamed, want) << "client " << i;
        preempted += f->body["timings"]["preempted"].get<int64_t>();
    }
    EXPECT_GT(preempted, 0);   // the done frames say which waited
    EXPECT_TRUE(srv.log_has("in f16: 192 positions")) << srv.log();   // what the pool holds, said at start
    EXPECT_TRUE(srv.log_has("preempted (the KV pool ran out: raise [server] kv_cache")) << srv.log();
    EXPECT_EQ(srv.stop(), 0) << srv.log();
}

TEST(Server, CancelBusyAndVanishingClientsLoseNothing) {
    ServerProcess srv("[server]\nmax_sequences = 1\nkv_cache = \"16MiB\"\nmax_queue = 2\nmax_tokens = 1000\n"
                      "drain_timeout_s = 10\n");   // the model's context is 1024
    ASSERT_FALSE(srv.endpoint().empty()) << srv.log();
    Client c(srv.endpoint());
    // cancel a streaming request after its second token
    c.send({{"id", "long"}, {"prompt_ids", {1, 2, 3}}, {"max_tokens", 1000}, {"stream", true}});
    int tokens = 0;
    std::optional<protocol::Response> f;
    while ((f = c.receive(30s)) && f->type == "token")
        if (++tokens == 2) c.send({{"type", "cancel"}, {"id", "long"}});
    ASSERT_TRUE(f);
    EXPECT_EQ(f->type, "done") << f->body.dump();
    EXPECT_EQ(f->body["finish_reason"], "cancelled");
    auto nf = c.request({{"type", "cancel"}, {"id", "nosuch"}}, 10s);
    ASSERT_TRUE(nf);
    EXPECT_EQ(nf->body["code"], "not_found");

    // one running, two waiting, the rest "busy" with a retry hint; every accepted one completes
    for (int i = 0; i < 6; ++i) c.send({{"id", "b" + std::to_string(i)}, {"prompt_ids", {5, 6, 7}}, {"max_tokens", 30}});
    int n_done = 0, n_busy = 0;
    for (int i = 0; i < 6; ++i) {
        auto r = c.receive(60s);
        ASSERT_TRUE(r);
        if (r->type == "done") ++n_done;
        if (r->type == "error") {
            EXPECT_EQ(r->body["code"], "busy");
            EXPECT_GT(r->body["retry_after_ms"].get<int64_t>(), 0);
            ++n_busy;
        }
    }
    EXPECT_EQ(n_done, 3);   // one slot + a queue of two
    EXPECT_EQ(n_busy, 3);

    // a client that goes away mid-request: its request is cancelled and its blocks freed
    {
        Client gone(srv.endpoint());
        gone.send({{"id", "g"}, {"prompt_ids", {1, 2}}, {"max_tokens", 1000}, {"stream", true}});
        ASSERT_TRUE(gone.receive(30s));   // it started
    }
    // the server still serves (the slot came free: this one would wait behind 1000 tokens otherwise)
    auto after = c.request({{"id", "after"}, {"prompt_ids", {9, 8}}, {"max_tokens", 4}}, 60s);
    ASSERT_TRUE(after) << srv.log();
    EXPECT_EQ(after->type, "done");
    EXPECT_EQ(srv.stop(), 0);
    EXPECT_NE(srv.log().find("replies undeliverable"), std::string::npos) << srv.log();
    EXPECT_EQ(srv.log().find(" 0 replies undeliverable"), std::string::npos) << srv.log();
}

TEST(Server, BadInputGetsErrorFramesAndEveryoneElseIsServed) {
    ServerProcess srv(k_config);
    ASSERT_FALSE(srv.endpoint().empty()) << srv.log();
    Client c(srv.endpoint());
    auto error_for = [&](const std::string & raw) -> std::string {
        c.send_raw(raw);
        auto f = c.receive(10s);
        if (!f) return "no answer";
        return f->type == "error" ? f->body["code"].get<std::string>() + ": " + f->body["message"].get<std::string>() : f->type;
    };
    EXPECT_EQ(error_for("\x01\x02garbage\xff").rfind("bad_request", 0), 0u);
    EXPECT_EQ(error_for("{\"id\": \"x\", \"prompt\": ").rfind("bad_request", 0), 0u);
    EXPECT_NE(error_for(R"({"id": "x", "prompt": "a", "bogus": 1})").find("bogus"), std::string::npos);
    EXPECT_NE(error_for(R"({"id": "x", "prompt": "a", "max_tokens": -5})").find("max_tokens"), std::string::npos);
    EXPECT_NE(error_for(R"({"id": "x", "prompt": "a", "max_tokens": 100000000})").find("max_tokens"), std::string::npos);
    EXPECT_NE(error_for(R"({"id": "x", "prompt": "a", "top_k": -1})").find("top_k"), std::string::npos);
    EXPECT_NE(error_for(R"({"id": "x", "prompt_ids": [1, 99999]})").find("prompt_ids"), std::string::npos);
    std::string long_prompt = R"({"id": "x", "max_tokens": 512, "prompt_ids": [1)";
    for (int i = 0; i < 600; ++i) long_prompt += ", 2";
    EXPECT_EQ(error_for(long_prompt + "]}").rfind("too_long", 0), 0u);   // 601 + 512 > the model's 1024 positions
    EXPECT_EQ(error_for(std::string(70000, 'x')).rfind("too_large", 0), 0u);   // over max_message_bytes
    // thousands of connects and disconnects
    for (int i = 0; i < 500; ++i) {
        Client k(srv.endpoint());
        if (i % 50 == 0) {
            EXPECT_TRUE(k.request({{"type", "ping"}, {"id", "k"}}, 10s));
        }
    }
    auto ok = c.request({{"id", "fine"}, {"prompt", "import os"}, {"max_tokens", 8}}, 60s);
    ASSERT_TRUE(ok) << srv.log();
    EXPECT_EQ(ok->type, "done") << ok->body.dump();
    EXPECT_EQ(srv.stop(), 0) << srv.log();
}

// CURVE with a list of client keys: the listed client is served, others are refused with a reason
// (the C++ client and `moesh client` both say it), and the server counts and logs the refusals.
TEST(Server, CurveLetsInListedClientsOnlyAndClientsSayWhy) {
    test::TempDir keys;
    std::filesystem::create_directories(keys.path() / "clients");
    const auto server = security::new_curve_cert(), alice = security::new_curve_cert(), mallory = security::new_curve_cert();
    const auto [server_pub, server_sec] = security::write_curve_cert(keys.path().string(), "server", server);
    const auto [alice_pub, alice_sec] = security::write_curve_cert(keys.path().string(), "alice", alice);
    const auto [mallory_pub, mallory_sec] = security::write_curve_cert(keys.path().string(), "mallory", mallory);
    std::filesystem::copy_file(alice_pub, keys.path() / "clients" / "alice.key");
    std::string config = k_config;
    config.insert(config.find("[runtime]"), "curve_secret_key = \"" + server_sec + "\"\ncurve_authorized_keys = \"" +
                                                (keys.path() / "clients").string() + "\"\n");
    ServerProcess srv(config);
    ASSERT_FALSE(srv.endpoint().empty()) << srv.log();
    const nlohmann::json req = {{"id", "a"}, {"prompt", "import os"}, {"max_tokens", 6}};
    {
        Client c(srv.endpoint(), {server.public_key, alice.secret_key});
        auto done = c.request(req, 60s);
        ASSERT_TRUE(done) << c.connection_note() << srv.log();
        EXPECT_EQ(done->type, "done") << done->body.dump();
        EXPECT_EQ(done->body["tokens"].size(), 6u);
    }
    auto refusal = [&](const CurveClientKeys & k) -> std::string {
        try {
            Client c(srv.endpoint(), k);
            auto r = c.request(req, 20s);
            return r ? "answered: " + r->type : "no answer: " + c.connection_note();
        } catch (const std::runtime_error & e) {
            return e.what();
        }
    };
    EXPECT_NE(refusal({server.public_key, mallory.secret_key}).find("refused this client's CURVE key"), std::string::npos);
    EXPECT_NE(refusal({server.public_key, ""}).find("refused this client's CURVE key"), std::string::npos) << "a fresh key";
    EXPECT_NE(refusal({}).find("require"), std::string::npos) << "no CURVE";

    const auto ok = test::run_moesh("client --endpoint " + srv.endpoint() + " --server-key " + server_pub + " --client-cert " +
                                    alice_sec + " --prompt-ids 5,6,7 -n 4 --output json --timeout 60");
    EXPECT_EQ(ok.status, 0) << ok.out;
    EXPECT_NE(ok.out.find("\"finish_reason\":\"length\""), std::string::npos) << ok.out;
    const auto no = test::run_moesh("client --endpoint " + srv.endpoint() + " --server-key '" + server.public_key + "' --client-cert " +
                                    mallory_sec + " --prompt-ids 5,6,7 -n 4 --timeout 20");
    EXPECT_EQ(no.status, 1) << no.out;
    EXPECT_NE(no.out.find("add the client's public key " + mallory.public_key), std::string::npos) << no.out;
    const auto bad = test::run_moesh("client --endpoint " + srv.endpoint() + " --server-key " + alice_sec + "x --prompt-ids 5 -n 1");
    EXPECT_NE(bad.out.find("--server-key: cannot read the certificate"), std::string::npos) << bad.out;

    // SIGHUP reads the list again: mallory is let in; a list that is now bad leaves it as it was.
    std::filesystem::copy_file(mallory_pub, keys.path() / "clients" / "mallory.key");
    srv.signal(SIGHUP);
    ASSERT_TRUE(srv.log_has("moesh: reloaded: 2 CURVE client key(s)")) << srv.log();
    {
        Client c(srv.endpoint(), {server.public_key, mallory.secret_key});
        auto done = c.request(req, 60s);
        ASSERT_TRUE(done) << c.connection_note() << srv.log();
        EXPECT_EQ(done->type, "done");
    }
    std::ofstream(keys.path() / "clients" / "broken.key") << "public-key = \"not a key\"\n";
    srv.signal(SIGHUP);
    ASSERT_TRUE(srv.log_has("moesh: reload failed, the keys stay as they were: [server] security: ")) << srv.log();
    EXPECT_TRUE(srv.log_has("broken.key:1: a key is 40 Z85 characters")) << srv.log();
    {
        Client c(srv.endpoint(), {server.public_key, mallory.secret_key});
        auto done = c.request(req, 60s);
        ASSERT_TRUE(done) << c.connection_note() << srv.log();
        EXPECT_EQ(done->type, "done") << "the keys as they were";
    }

    EXPECT_EQ(srv.stop(), 0) << srv.log();
    const std::string log = srv.log();
    EXPECT_NE(log.find("CURVE on tcp://127.0.0.1:"), std::string::npos) << log;
    EXPECT_NE(log.find("1 client key(s) let in"), std::string::npos) << log;
    EXPECT_NE(log.find("whose key is not in curve_authorized_keys"), std::string::npos) << log;
}

} // namespace
} // namespace moesh
