//! What a test needs from the machine besides PostgreSQL: a data set (Pagila, the regression
//! database), a tool (openssl, chromium) or another server version. When it is missing the test
//! calls [`missing`]: under CI (`CI=true`) the test fails and says how to install it; elsewhere it
//! prints a loud SKIPPED line naming the test, and the caller returns.

/// True when the tests run under CI (`CI=true` or `CI=1`), where nothing may be skipped.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// `what` is not on this machine; `install` says how to get it. Panics under CI; otherwise prints
/// `*** SKIPPED <test>: ... ***` and returns, and the caller returns without asserting anything.
pub fn missing(what: &str, install: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("this test");
    if under_ci() {
        panic!(
            "{test}: {what}; under CI=true this is a failure, not a skip. Install it: {install}"
        );
    }
    eprintln!("\n*** SKIPPED {test}: {what} (install it: {install}) ***\n");
}
