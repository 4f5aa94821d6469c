//! The RESP client against a scripted server, and the console follower on a growing
//! file.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::Duration;

use twinrun_lab::console::ConsoleLog;
use twinrun_lab::resp::{Reply, Resp};

#[test]
fn resp_replies_of_every_kind() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let replies: [&[u8]; 6] = [
            b"+OK\r\n",
            b":42\r\n",
            b"$5\r\nhe\r\no\r\n",
            b"$-1\r\n",
            b"-ERR nope\r\n",
            b"?what\r\n",
        ];
        for reply in replies {
            // One command: `*<n>` then n pairs of `$<len>` and the argument.
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let n: usize = line.trim()[1..].parse().unwrap();
            for _ in 0..2 * n {
                line.clear();
                r.read_line(&mut line).unwrap();
            }
            w.write_all(reply).unwrap();
        }
    });
    let mut c = Resp::connect(addr, Duration::from_secs(5)).unwrap();
    assert_eq!(
        c.call(&["SET", "k", "v"]).unwrap(),
        Reply::Simple("OK".into())
    );
    assert_eq!(c.call(&["INCR", "n"]).unwrap(), Reply::Int(42));
    assert_eq!(
        c.call(&["GET", "k"]).unwrap().text().as_deref(),
        Some("he\r\no")
    );
    assert_eq!(c.cmd(&[b"GET", b"none"]).unwrap(), Reply::Bulk(None));
    assert_eq!(c.call(&["X"]).unwrap(), Reply::Error("ERR nope".into()));
    assert!(c.call(&["Y"]).is_err(), "an unknown reply type is an error");
    server.join().unwrap();
    assert!(c.call(&["Z"]).is_err(), "the server closed the connection");
}

#[test]
fn console_log_follows_a_growing_file() {
    let dir = std::env::temp_dir().join(format!("twinrun-lab-console-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.log");
    let mut log = ConsoleLog::new(&path);
    assert_eq!(
        log.next_line(Duration::from_millis(50)),
        None,
        "no file yet"
    );
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(b"BOOT x\nC 1\nC").unwrap();
    assert_eq!(
        log.next_line(Duration::from_secs(1)).as_deref(),
        Some("BOOT x")
    );
    assert_eq!(
        log.next_line(Duration::from_secs(1)).as_deref(),
        Some("C 1")
    );
    assert_eq!(
        log.next_line(Duration::from_millis(50)),
        None,
        "partial line held"
    );
    f.write_all(b" 2\n").unwrap();
    assert_eq!(
        log.wait_for(Duration::from_secs(1), |l| l.starts_with("C "))
            .as_deref(),
        Ok("C 2")
    );
    // The writer is gone: the wait ends at once.
    let t0 = std::time::Instant::now();
    let r = log.wait_while(Duration::from_secs(30), |l| l == "never", || false);
    assert!(r.is_err() && t0.elapsed() < Duration::from_secs(5));
    std::fs::remove_dir_all(&dir).unwrap();
}
