#include "transport/local_port.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace moesh {

LocalPort::LocalPort() {
    fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd_ < 0) throw std::runtime_error(std::string("eventfd: ") + std::strerror(errno));
}

LocalPort::~LocalPort() {
    if (fd_ >= 0) ::close(fd_);
}

void LocalPort::push(Message m) {
    {
        std::lock_guard<std::mutex> lock(mu_);
        inbox_.push_back(std::move(m));
    }
    const uint64_t one = 1;
    // Cannot fail short of a counter overflow (2^64 - 1 wake-ups): the reader resets it.
    [[maybe_unused]] const ssize_t n = ::write(fd_, &one, sizeof one);
}

void LocalPort::take(std::vector<Message> & out) {
    uint64_t count = 0;
    [[maybe_unused]] const ssize_t n = ::read(fd_, &count, sizeof count);   // EAGAIN when nothing was pushed
    std::lock_guard<std::mutex> lock(mu_);
    for (Message & m : inbox_) out.push_back(std::move(m));
    inbox_.clear();
}

} // namespace moesh
