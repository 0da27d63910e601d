// The in-process way into `moesh serve`: clients living in the server's
// process (the HTTP front) exchange the same protocol frames as ZeroMQ
// clients, without a socket. A client sends request frames from its own
// thread; the server's loop wakes on fd(), takes them, and answers through
// deliver(), which hands each frame to the receiver the front installed.
//
//   LocalPort port;
//   port.set_receiver([](uint64_t client, std::string frame) { ...; return true; });   // front
//   port.send(client, protocol::request_frame(r));                                     // front, any thread
//   poll(port.fd()); port.take(messages); ... port.deliver(client, frame);              // server loop
//
// The receiver returns false when the frame cannot be delivered (the client
// went away, or is too far behind): the server treats it as it treats a
// ZeroMQ peer that is gone. The port also carries what a health check needs
// without a round trip through the loop (state, queue fill), as atomics.
//
// Thread safety: send/take, drain and the atomics from any thread; deliver()
// on the server's thread; set_receiver/set_drain_hook before the server runs.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

namespace moesh {

class LocalPort {
public:
    enum class State { Loading, Ready, Draining };
    enum class Kind { Frame, Metrics };   // Metrics: the server answers with its Prometheus text
    struct Message {
        uint64_t client = 0;
        Kind kind = Kind::Frame;
        std::string body;
    };
    using Receiver = std::function<bool(uint64_t client, std::string frame)>;

    LocalPort();   // throws std::runtime_error when no eventfd can be had
    ~LocalPort();
    LocalPort(const LocalPort &) = delete;
    LocalPort & operator=(const LocalPort &) = delete;

    uint64_t new_client() { return next_client_.fetch_add(1) + 1; }   // never 0
    void send(uint64_t client, std::string frame) { push({client, Kind::Frame, std::move(frame)}); }
    void ask_metrics(uint64_t client) { push({client, Kind::Metrics, {}}); }

    int fd() const { return fd_; }   // readable while messages wait
    void take(std::vector<Message> & out);   // appends every waiting message, in order

    void set_receiver(Receiver r) { receiver_ = std::move(r); }
    // The server stops taking requests: state Draining, and the front's hook (it stops accepting).
    void set_drain_hook(std::function<void()> hook) { drain_hook_ = std::move(hook); }
    void drain() {
        state = State::Draining;
        if (drain_hook_) drain_hook_();
    }
    bool deliver(uint64_t client, std::string frame) const { return receiver_ && receiver_(client, std::move(frame)); }

    std::atomic<State> state{State::Loading};
    std::atomic<int64_t> queued{0}, running{0}, max_queue{0};   // published by the server after each step

private:
    void push(Message m);

    int fd_ = -1;
    std::mutex mu_;
    std::vector<Message> inbox_;
    std::atomic<uint64_t> next_client_{0};
    Receiver receiver_;
    std::function<void()> drain_hook_;
};

} // namespace moesh
