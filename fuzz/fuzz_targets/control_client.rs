//! The control protocol from the client's side (`kvmi-relay stats`): whatever the socket at the
//! path says, `ask` takes it for a relay only when its first line is exactly the greeting, and
//! then returns exactly what followed it (when it is text); anything else is "not a control
//! socket" (InvalidData), with what was seen escaped: no control character in the message.
//! A server thread plays the socket: it writes the input and its end, reads the request line
//! (or the client giving up) and closes.
#![no_main]
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Mutex, OnceLock};

use kvmi_relay::observe::control::{GREETING, ask};
use libfuzzer_sys::fuzz_target;

struct Server {
    path: PathBuf,
    to_server: Mutex<SyncSender<Vec<u8>>>,
    served: Mutex<Receiver<()>>,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        // The client's request meets a socket that may be closed: an error, not a signal.
        // SAFETY: setting a signal's disposition to SIG_IGN touches no memory.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let dir = std::env::temp_dir().join(format!("kvmi-relay-fuzz-control-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (to_server, inputs) = sync_channel::<Vec<u8>>(0);
        let (done, served) = sync_channel::<()>(0);
        std::thread::spawn(move || {
            for input in inputs {
                let (mut s, _) = listener.accept().unwrap();
                let _ = s.write_all(&input);
                let _ = s.shutdown(std::net::Shutdown::Write);
                // Hears the request (or the client giving up) before closing, as a relay does.
                let mut b = [0u8; 64];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || b[..n].contains(&b'\n') {
                        break;
                    }
                }
                drop(s);
                done.send(()).unwrap();
            }
        });
        Server { path, to_server: Mutex::new(to_server), served: Mutex::new(served) }
    })
}

fuzz_target!(|data: &[u8]| {
    let srv = server();
    srv.to_server.lock().unwrap().send(data.to_vec()).unwrap();
    let got = ask(&srv.path, "stats json");
    srv.served.lock().unwrap().recv().unwrap();
    let first_line = &data[..data.iter().position(|&b| b == b'\n').map_or(data.len(), |i| i + 1)];
    match got {
        Ok(answer) => {
            assert_eq!(first_line, GREETING, "taken for a relay: {:?}", String::from_utf8_lossy(data));
            assert_eq!(answer.as_bytes(), &data[GREETING.len()..]);
        }
        Err(e) if e.kind() == ErrorKind::InvalidData => {
            let text = e.to_string();
            assert!(!text.chars().any(char::is_control), "{text:?}");
            // Either not the greeting, or a greeting followed by an answer that is not text.
            if first_line == GREETING {
                assert!(std::str::from_utf8(&data[GREETING.len()..]).is_err(), "{text}");
            }
        }
        Err(e) => panic!("{e}"),
    }
});
