# empty_gate_choice.kt: an empty choice of gates
# expect: E403
graph empty_gate_choice
data digits { val_split = 300 }
node a : cnn_tiny [target]
label -> a : choice()
